//! The replicated state machine, persisted in redb (`state.redb`).
//!
//! Tables: one per [`Table`] (`id → [version u64][created u64][value]`), `_meta` (last applied
//! log id, last membership, events floor), `_events` (the most recent `event_retention` events:
//! one row per revision, `(revision, index of its last event) → JSON array of its events`; rows
//! of older stores, one per event, `(revision, op index) → Event JSON`, are still read) and
//! `_snapshot` (the current snapshot's meta and data).
//! With a keyring every value is sealed ([`crate::at_rest`]), with AAD `table name + "\0" +
//! key` (object id; revision and op index u64/u32 BE for events; the meta or snapshot key).
//!
//! # Durability of apply
//! `apply` commits with `Durability::None` (no fsync). That is safe because:
//! 1. openraft persists the committed log id (`save_committed`, fsynced) *before* it asks the
//!    state machine to apply, and `Raft::new` re-applies the log from the state machine's
//!    durable `last_applied` up to that committed id before it returns. A crash can therefore
//!    only lose applies that are re-done (deterministically, events included) on restart, and a
//!    restarted node never serves reads older than what it had acknowledged as committed.
//! 2. Every snapshot build and install commits with `Durability::Immediate`, which makes all
//!    earlier non-durable commits durable too. Openraft purges the log only up to a snapshot,
//!    so the entries needed for re-apply are always still in the log.
//!
//! [`crate::Store::shutdown`] additionally makes the state durable on a clean stop.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use tokio::sync::broadcast;

use crate::at_rest::{copy_table, count_plain, durable_write, Sealer};
use crate::error::{storage, StoreError};
use crate::raft_types::{
    blocking, read_err, write_err, Entry, LogId, Response, Snapshot, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig,
};
use crate::types::{Batch, Event, EventKind, FailureKind, Op, OpFailure, Table, Versioned};

const META_NAME: &str = "_meta";
const EVENTS_NAME: &str = "_events";
const SNAPSHOT_NAME: &str = "_snapshot";
const META: TableDefinition<&str, &[u8]> = TableDefinition::new(META_NAME);
const EVENTS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new(EVENTS_NAME);
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new(SNAPSHOT_NAME);

const KEY_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "last_membership";
const KEY_EVENTS_FLOOR: &str = "events_floor";
const KEY_SNAP_META: &str = "meta";
const KEY_SNAP_DATA: &str = "data";

const SNAPSHOT_MAGIC: &[u8; 8] = b"FLTSNAP1";

type ObjTable<'txn> = redb::Table<'txn, &'static str, &'static [u8]>;

fn obj_def(t: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(t.as_str())
}

/// A stored object without its id.
#[derive(Clone)]
struct Rec {
    version: u64,
    created: u64,
    value: Vec<u8>,
}

fn decode_rec(bytes: &[u8]) -> Result<Rec, String> {
    if bytes.len() < 16 {
        return Err(format!("object record too short ({} bytes)", bytes.len()));
    }
    let (v, rest) = bytes.split_at(8);
    let (c, value) = rest.split_at(8);
    let mut vb = [0u8; 8];
    vb.copy_from_slice(v);
    let mut cb = [0u8; 8];
    cb.copy_from_slice(c);
    Ok(Rec {
        version: u64::from_le_bytes(vb),
        created: u64::from_le_bytes(cb),
        value: value.to_vec(),
    })
}

fn event_key(revision: u64, seq: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&revision.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Encodes and seals an object record of `table` for `id`.
fn seal_rec(
    sealer: &Sealer,
    table: Table,
    id: &str,
    version: u64,
    created: u64,
    value: &[u8],
) -> Result<Vec<u8>, String> {
    let mut buf = sealer.buffer(16 + value.len());
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(&created.to_le_bytes());
    buf.extend_from_slice(value);
    sealer.seal_buf(table.as_str(), id.as_bytes(), buf)
}

/// Opens and decodes an object record of `table` for `id`.
fn open_rec(sealer: &Sealer, table: Table, id: &str, stored: &[u8]) -> Result<Rec, String> {
    decode_rec(&sealer.open(table.as_str(), id.as_bytes(), stored)?)
}

/// Counts the plain values of a state file (for the upgrade to encryption at rest).
pub(crate) fn count_plain_values(db: &Database) -> Result<u64, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let mut n = count_plain!(txn, META) + count_plain!(txn, EVENTS) + count_plain!(txn, SNAPSHOT);
    for t in Table::ALL {
        n += count_plain!(txn, obj_def(*t));
    }
    Ok(n)
}

/// Copies a state file sealing every plain value (the upgrade to encryption at rest).
pub(crate) fn copy_sealed(src: &Database, dst: &Database, sealer: &Sealer) -> Result<u64, String> {
    let from = src.begin_read().map_err(|e| e.to_string())?;
    let txn = durable_write(dst)?;
    let mut n = 0;
    {
        n += copy_table!(from, txn, META, META_NAME, sealer, |k| k.as_bytes());
        n += copy_table!(from, txn, SNAPSHOT, SNAPSHOT_NAME, sealer, |k| k.as_bytes());
        n += copy_table!(from, txn, EVENTS, EVENTS_NAME, sealer, |k| event_key(
            k.0, k.1
        ));
        for t in Table::ALL {
            n += copy_table!(from, txn, obj_def(*t), t.as_str(), sealer, |k| k.as_bytes());
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(n)
}

/// What the live change feed carries.
#[derive(Debug, Clone)]
pub(crate) enum Feed {
    /// All events of one applied entry (same revision), in op order.
    Entry(Arc<Vec<Event>>),
    /// A snapshot replaced the state; history before `oldest` is gone.
    Reset { oldest: u64 },
}

/// State shared between the state machine (inside openraft) and the `Store` handle.
pub(crate) struct SmShared {
    /// Last applied log index.
    pub(crate) applied: AtomicU64,
    pub(crate) feed: broadcast::Sender<Feed>,
    pub(crate) event_retention: u64,
}

pub(crate) struct StateMachine {
    db: Arc<Database>,
    shared: Arc<SmShared>,
    sealer: Sealer,
    /// Events the `_events` table holds (counted from its keys on open).
    events: u64,
}

impl StateMachine {
    /// Wraps an open database, creating the tables if needed.
    pub(crate) fn open(
        db: Arc<Database>,
        event_retention: u64,
        sealer: Sealer,
    ) -> Result<StateMachine, StorageError> {
        init_tables(&db).map_err(write_err)?;
        let applied = applied_index(&db, &sealer).map_err(read_err)?;
        let events = count_events(&db).map_err(read_err)?;
        let (feed, _) = broadcast::channel(1024);
        let shared = Arc::new(SmShared {
            applied: AtomicU64::new(applied),
            feed,
            event_retention,
        });
        Ok(StateMachine {
            db,
            shared,
            sealer,
            events,
        })
    }

    pub(crate) fn shared(&self) -> Arc<SmShared> {
        self.shared.clone()
    }
}

pub(crate) fn init_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        txn.open_table(META).map_err(storage)?;
        txn.open_table(EVENTS).map_err(storage)?;
        txn.open_table(SNAPSHOT).map_err(storage)?;
        for t in Table::ALL {
            txn.open_table(obj_def(*t)).map_err(storage)?;
        }
    }
    txn.commit().map_err(storage)
}

/// Reads the JSON value at `key` of the table named `name` (`_meta` or `_snapshot`).
fn read_json<T: serde::de::DeserializeOwned>(
    sealer: &Sealer,
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
    key: &str,
) -> Result<Option<T>, String> {
    match table.get(key).map_err(|e| e.to_string())? {
        Some(v) => {
            let bytes = sealer.open(name, key.as_bytes(), v.value())?;
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| e.to_string())
        }
        None => Ok(None),
    }
}

/// Encodes and seals a JSON value for `key` of the table named `name`.
fn seal_json<T: serde::Serialize>(
    sealer: &Sealer,
    name: &str,
    key: &str,
    value: &T,
) -> Result<Vec<u8>, StorageError> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    sealer.seal(name, key.as_bytes(), bytes).map_err(write_err)
}

fn applied_in(txn: &ReadTransaction, sealer: &Sealer) -> Result<u64, String> {
    let meta = txn.open_table(META).map_err(|e| e.to_string())?;
    let applied: Option<LogId> = read_json(sealer, &meta, META_NAME, KEY_APPLIED)?;
    Ok(applied.map(|l| l.index).unwrap_or(0))
}

pub(crate) fn applied_index(db: &Database, sealer: &Sealer) -> Result<u64, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    applied_in(&txn, sealer)
}

/// Reads `(last_applied, last_membership)`.
pub(crate) fn read_applied_state(
    db: &Database,
    sealer: &Sealer,
) -> Result<(Option<LogId>, StoredMembership), String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let meta = txn.open_table(META).map_err(|e| e.to_string())?;
    let applied: Option<LogId> = read_json(sealer, &meta, META_NAME, KEY_APPLIED)?;
    let membership: Option<StoredMembership> = read_json(sealer, &meta, META_NAME, KEY_MEMBERSHIP)?;
    Ok((applied, membership.unwrap_or_default()))
}

fn to_versioned(
    sealer: &Sealer,
    table: Table,
    id: &str,
    bytes: &[u8],
) -> Result<Versioned, StoreError> {
    let rec = open_rec(sealer, table, id, bytes).map_err(StoreError::Storage)?;
    Ok(Versioned {
        id: id.to_string(),
        version: rec.version,
        created: rec.created,
        value: rec.value,
    })
}

pub(crate) fn get(
    db: &Database,
    sealer: &Sealer,
    table: Table,
    id: &str,
) -> Result<Option<Versioned>, StoreError> {
    let txn = db.begin_read().map_err(storage)?;
    let t = txn.open_table(obj_def(table)).map_err(storage)?;
    match t.get(id).map_err(storage)? {
        Some(v) => Ok(Some(to_versioned(sealer, table, id, v.value())?)),
        None => Ok(None),
    }
}

/// Lists a table and returns the applied revision it was read at (one read transaction).
pub(crate) fn list(
    db: &Database,
    sealer: &Sealer,
    table: Table,
) -> Result<(u64, Vec<Versioned>), StoreError> {
    let txn = db.begin_read().map_err(storage)?;
    let revision = applied_in(&txn, sealer).map_err(StoreError::Storage)?;
    let t = txn.open_table(obj_def(table)).map_err(storage)?;
    let mut out = Vec::with_capacity(usize::try_from(t.len().map_err(storage)?).unwrap_or(0));
    for item in t.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        out.push(to_versioned(sealer, table, k.value(), v.value())?);
    }
    Ok((revision, out))
}

/// Every object of every table (force-new-cluster recovery).
pub(crate) fn export_all(
    db: &Database,
    sealer: &Sealer,
) -> Result<Vec<(Table, Vec<Versioned>)>, StoreError> {
    Table::ALL
        .iter()
        .map(|t| list(db, sealer, *t).map(|(_, objs)| (*t, objs)))
        .collect()
}

/// Retained events with revision > `after` (about `limit` of them, whole revisions only), or
/// `Compacted` if some of them are gone.
pub(crate) fn events_after(
    db: &Database,
    sealer: &Sealer,
    after: u64,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = txn.open_table(META).map_err(storage)?;
    let floor: u64 = read_json(sealer, &meta, META_NAME, KEY_EVENTS_FLOOR)
        .map_err(StoreError::Storage)?
        .unwrap_or(0);
    if after < floor {
        return Err(StoreError::Compacted { oldest: floor });
    }
    let events = txn.open_table(EVENTS).map_err(storage)?;
    let mut out = Vec::new();
    for item in events
        .range((after.saturating_add(1), 0u32)..)
        .map_err(storage)?
    {
        let (k, v) = item.map_err(storage)?;
        let (revision, seq) = k.value();
        // Stop at a page boundary, but never in the middle of a revision.
        if out.len() >= limit && out.last().map(|e: &Event| e.revision) != Some(revision) {
            break;
        }
        let bytes = sealer
            .open(EVENTS_NAME, &event_key(revision, seq), v.value())
            .map_err(StoreError::Storage)?;
        // A revision's row holds an array; a row of an older store, one event.
        if bytes.first() == Some(&b'[') {
            out.extend(serde_json::from_slice::<Vec<Event>>(&bytes).map_err(storage)?);
        } else {
            out.push(serde_json::from_slice::<Event>(&bytes).map_err(storage)?);
        }
    }
    Ok(out)
}

/// Makes every earlier non-durable commit durable.
pub(crate) fn sync(db: &Database) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(Durability::Immediate).map_err(storage)?;
    txn.commit().map_err(storage)
}

fn open_obj<'m, 'txn>(
    txn: &'txn WriteTransaction,
    tables: &'m mut HashMap<Table, ObjTable<'txn>>,
    t: Table,
) -> Result<&'m mut ObjTable<'txn>, StorageError> {
    Ok(match tables.entry(t) {
        MapEntry::Occupied(o) => o.into_mut(),
        MapEntry::Vacant(v) => v.insert(txn.open_table(obj_def(t)).map_err(write_err)?),
    })
}

/// Applies one batch at `index` inside `txn`: checks every precondition against the state as
/// left by the previous ops of the batch, and writes only if all pass.
fn apply_batch(
    txn: &WriteTransaction,
    sealer: &Sealer,
    index: u64,
    batch: &Batch,
) -> Result<(Result<(), OpFailure>, Vec<Event>), StorageError> {
    let mut tables: HashMap<Table, ObjTable<'_>> = HashMap::new();
    let mut overlay: HashMap<(Table, &str), Option<Rec>> = HashMap::new();
    let mut events = Vec::with_capacity(batch.ops.len());

    for (op_index, op) in batch.ops.iter().enumerate() {
        let table = op.table();
        let id = op.id();
        let current = match overlay.get(&(table, id)) {
            Some(cur) => cur.clone(),
            None => {
                let t = open_obj(txn, &mut tables, table)?;
                let found = t.get(id).map_err(read_err)?;
                match found {
                    Some(v) => Some(open_rec(sealer, table, id, v.value()).map_err(read_err)?),
                    None => None,
                }
            }
        };
        let fail = |kind| {
            Ok((
                Err(OpFailure {
                    op_index,
                    table,
                    id: id.to_string(),
                    kind,
                }),
                Vec::new(),
            ))
        };
        let check_version = |cur: &Rec, expect: &Option<u64>| match expect {
            Some(expected) if *expected != cur.version => Some(FailureKind::VersionConflict {
                current: cur.version,
                expected: *expected,
            }),
            _ => None,
        };
        let (next, kind, event_value, event_version) = match op {
            Op::Create { value, .. } => {
                if current.is_some() {
                    return fail(FailureKind::AlreadyExists);
                }
                let rec = Rec {
                    version: index,
                    created: index,
                    value: value.clone(),
                };
                (Some(rec), EventKind::Created, Some(value.clone()), index)
            }
            Op::Update {
                value,
                expect_version,
                ..
            } => {
                let Some(cur) = current else {
                    return fail(FailureKind::NotFound);
                };
                if let Some(kind) = check_version(&cur, expect_version) {
                    return fail(kind);
                }
                let rec = Rec {
                    version: index,
                    created: cur.created,
                    value: value.clone(),
                };
                (Some(rec), EventKind::Updated, Some(value.clone()), index)
            }
            Op::Upsert { value, .. } => {
                let (created, kind) = match &current {
                    Some(cur) => (cur.created, EventKind::Updated),
                    None => (index, EventKind::Created),
                };
                let rec = Rec {
                    version: index,
                    created,
                    value: value.clone(),
                };
                (Some(rec), kind, Some(value.clone()), index)
            }
            Op::Delete { expect_version, .. } => {
                let Some(cur) = current else {
                    return fail(FailureKind::NotFound);
                };
                if let Some(kind) = check_version(&cur, expect_version) {
                    return fail(kind);
                }
                (None, EventKind::Deleted, Some(cur.value), cur.version)
            }
        };
        overlay.insert((table, id), next);
        events.push(Event {
            revision: index,
            table,
            id: id.to_string(),
            kind,
            value: event_value,
            version: event_version,
        });
    }

    for ((table, id), rec) in overlay {
        let t = open_obj(txn, &mut tables, table)?;
        match rec {
            Some(rec) => {
                let stored = seal_rec(sealer, table, id, rec.version, rec.created, &rec.value)
                    .map_err(write_err)?;
                t.insert(id, stored.as_slice()).map_err(write_err)?;
            }
            None => {
                t.remove(id).map_err(write_err)?;
            }
        }
    }
    Ok((Ok(()), events))
}

/// How many events the `_events` row at `key` holds, `prev` being the row before it: the events
/// of its revision up to op `key.1` that no earlier row of that revision holds (all of them for
/// a revision's row, one for each row of an older store).
fn row_events(prev: Option<(u64, u32)>, key: (u64, u32)) -> u64 {
    let before = match prev {
        Some((revision, last)) if revision == key.0 => u64::from(last) + 1,
        _ => 0,
    };
    (u64::from(key.1) + 1).saturating_sub(before)
}

/// How many events the `_events` table holds (from its keys).
fn count_events(db: &Database) -> Result<u64, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let events = txn.open_table(EVENTS).map_err(|e| e.to_string())?;
    let mut n = 0u64;
    let mut prev = None;
    for item in events.iter().map_err(|e| e.to_string())? {
        let (k, _) = item.map_err(|e| e.to_string())?;
        let key = k.value();
        n += row_events(prev, key);
        prev = Some(key);
    }
    Ok(n)
}

/// Drops the oldest events (whole revisions) once there are noticeably more than `retention`;
/// `count` is how many the table holds, kept up to date. Returns the new floor (every event
/// with revision > floor is still retained).
fn prune_events(
    events: &mut redb::Table<'_, (u64, u32), &'static [u8]>,
    count: &mut u64,
    retention: u64,
) -> Result<Option<u64>, StorageError> {
    let slack = (retention / 16).max(64);
    if *count <= retention.saturating_add(slack) {
        return Ok(None);
    }
    let to_delete = *count - retention;
    let mut cutoff = None;
    let mut deleted = 0u64;
    let mut prev = None;
    for item in events.iter().map_err(read_err)? {
        let (k, _) = item.map_err(read_err)?;
        let key = k.value();
        if cutoff.is_some_and(|rev| rev != key.0) {
            break;
        }
        deleted += row_events(prev, key);
        prev = Some(key);
        if cutoff.is_none() && deleted >= to_delete {
            cutoff = Some(key.0);
        }
    }
    if let Some(rev) = cutoff {
        events
            .retain_in(..=(rev, u32::MAX), |_, _| false)
            .map_err(write_err)?;
        *count = count.saturating_sub(deleted);
    }
    Ok(cutoff)
}

/// Result of applying entries: one response per entry, the events of each entry that produced
/// any, the last applied index, and how many events the table holds now.
type Applied = (Vec<Response>, Vec<Vec<Event>>, u64, u64);

/// Applies entries in one (non-durable, see module docs) write transaction.
fn apply_entries(
    db: &Database,
    sealer: &Sealer,
    entries: Vec<Entry>,
    retention: u64,
    mut events_held: u64,
) -> Result<Applied, StorageError> {
    let mut txn = db.begin_write().map_err(write_err)?;
    txn.set_durability(Durability::None).map_err(write_err)?;
    let mut responses = Vec::with_capacity(entries.len());
    let mut feeds = Vec::new();
    let mut last_applied: Option<LogId> = None;
    let mut membership: Option<StoredMembership> = None;
    {
        let mut events = txn.open_table(EVENTS).map_err(write_err)?;
        for entry in entries {
            let log_id = entry.log_id;
            last_applied = Some(log_id);
            match entry.payload {
                EntryPayload::Blank => responses.push(Response { result: Ok(()) }),
                EntryPayload::Normal(batch) => {
                    let (result, evs) = apply_batch(&txn, sealer, log_id.index, &batch)?;
                    if let Some(last) = evs.len().checked_sub(1) {
                        // One row (one sealed value) for all the events of this revision.
                        let last = u32::try_from(last).map_err(write_err)?;
                        let hint = 2 + evs
                            .iter()
                            .map(|ev| {
                                128 + ev.id.len() + ev.value.as_ref().map_or(0, |v| v.len() * 9 / 8)
                            })
                            .sum::<usize>();
                        let mut buf = sealer.buffer(hint);
                        serde_json::to_writer(&mut buf, &evs).map_err(write_err)?;
                        let bytes = sealer
                            .seal_buf(EVENTS_NAME, &event_key(log_id.index, last), buf)
                            .map_err(write_err)?;
                        let replaced = events
                            .insert((log_id.index, last), bytes.as_slice())
                            .map_err(write_err)?
                            .is_some();
                        if !replaced {
                            events_held += evs.len() as u64;
                        }
                        feeds.push(evs);
                    }
                    responses.push(Response { result });
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(log_id), m));
                    responses.push(Response { result: Ok(()) });
                }
            }
        }
        let floor = prune_events(&mut events, &mut events_held, retention)?;
        let mut meta = txn.open_table(META).map_err(write_err)?;
        let applied = seal_json(sealer, META_NAME, KEY_APPLIED, &last_applied)?;
        meta.insert(KEY_APPLIED, applied.as_slice())
            .map_err(write_err)?;
        if let Some(m) = &membership {
            let bytes = seal_json(sealer, META_NAME, KEY_MEMBERSHIP, m)?;
            meta.insert(KEY_MEMBERSHIP, bytes.as_slice())
                .map_err(write_err)?;
        }
        if let Some(floor) = floor {
            let bytes = seal_json(sealer, META_NAME, KEY_EVENTS_FLOOR, &floor)?;
            meta.insert(KEY_EVENTS_FLOOR, bytes.as_slice())
                .map_err(write_err)?;
        }
    }
    txn.commit().map_err(write_err)?;
    Ok((
        responses,
        feeds,
        last_applied.map(|l| l.index).unwrap_or(0),
        events_held,
    ))
}

// ---- snapshot data format ----
// "FLTSNAP1", u32 table count, per table: u16 name length, name, u64 object count,
// per object: u32 id length, id, u64 version, u64 created, u32 value length, value.
// Tables are stored by name so tables can be added later.

fn encode_snapshot(txn: &ReadTransaction, sealer: &Sealer) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(
        &u32::try_from(Table::ALL.len())
            .map_err(read_err)?
            .to_le_bytes(),
    );
    for t in Table::ALL {
        let table = txn.open_table(obj_def(*t)).map_err(read_err)?;
        let name = t.as_str().as_bytes();
        out.extend_from_slice(&u16::try_from(name.len()).map_err(read_err)?.to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&table.len().map_err(read_err)?.to_le_bytes());
        for item in table.iter().map_err(read_err)? {
            let (k, v) = item.map_err(read_err)?;
            let rec = open_rec(sealer, *t, k.value(), v.value()).map_err(read_err)?;
            let id = k.value().as_bytes();
            out.extend_from_slice(&u32::try_from(id.len()).map_err(read_err)?.to_le_bytes());
            out.extend_from_slice(id);
            out.extend_from_slice(&rec.version.to_le_bytes());
            out.extend_from_slice(&rec.created.to_le_bytes());
            out.extend_from_slice(
                &u32::try_from(rec.value.len())
                    .map_err(read_err)?
                    .to_le_bytes(),
            );
            out.extend_from_slice(&rec.value);
        }
    }
    Ok(out)
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err("snapshot data is truncated".to_string());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn str(&mut self, n: usize) -> Result<&'a str, String> {
        std::str::from_utf8(self.take(n)?)
            .map_err(|e| format!("snapshot holds a non-UTF-8 name: {e}"))
    }
}

/// Replaces every object table with the snapshot's content inside `txn`.
fn load_snapshot(txn: &WriteTransaction, sealer: &Sealer, data: &[u8]) -> Result<(), String> {
    let mut r = Reader { buf: data };
    if r.take(SNAPSHOT_MAGIC.len())? != SNAPSHOT_MAGIC {
        return Err("not a flotilla snapshot (bad magic)".to_string());
    }
    for t in Table::ALL {
        txn.delete_table(obj_def(*t)).map_err(|e| e.to_string())?;
        txn.open_table(obj_def(*t)).map_err(|e| e.to_string())?;
    }
    let tables = r.u32()?;
    for _ in 0..tables {
        let name_len = usize::from(r.u16()?);
        let name = r.str(name_len)?;
        let table: Table = name.parse().map_err(|e: StoreError| e.to_string())?;
        let mut t = txn.open_table(obj_def(table)).map_err(|e| e.to_string())?;
        let count = r.u64()?;
        for _ in 0..count {
            let id_len = usize::try_from(r.u32()?).map_err(|e| e.to_string())?;
            let id = r.str(id_len)?;
            let version = r.u64()?;
            let created = r.u64()?;
            let value_len = usize::try_from(r.u32()?).map_err(|e| e.to_string())?;
            let value = r.take(value_len)?;
            let stored = seal_rec(sealer, table, id, version, created, value)?;
            t.insert(id, stored.as_slice()).map_err(|e| e.to_string())?;
        }
    }
    if !r.buf.is_empty() {
        return Err("snapshot data has trailing bytes".to_string());
    }
    Ok(())
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub(crate) struct SnapshotBuilder {
    db: Arc<Database>,
    sealer: Sealer,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let db = self.db.clone();
        let sealer = self.sealer.clone();
        let (meta, data) = blocking(move || {
            let (meta, data) = {
                let txn = db.begin_read().map_err(read_err)?;
                let meta_table = txn.open_table(META).map_err(read_err)?;
                let last_log_id: Option<LogId> =
                    read_json(&sealer, &meta_table, META_NAME, KEY_APPLIED).map_err(read_err)?;
                let last_membership: StoredMembership =
                    read_json(&sealer, &meta_table, META_NAME, KEY_MEMBERSHIP)
                        .map_err(read_err)?
                        .unwrap_or_default();
                let data = encode_snapshot(&txn, &sealer)?;
                let snapshot_id = match &last_log_id {
                    Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, now_nanos()),
                    None => format!("0-0-{}", now_nanos()),
                };
                (
                    SnapshotMeta {
                        last_log_id,
                        last_membership,
                        snapshot_id,
                    },
                    data,
                )
            };
            // Immediate: also makes every earlier non-durable apply durable, before openraft
            // purges the log up to this snapshot.
            let mut txn = db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate)
                .map_err(write_err)?;
            {
                let mut snap = txn.open_table(SNAPSHOT).map_err(write_err)?;
                let stored: Option<SnapshotMeta> =
                    read_json(&sealer, &snap, SNAPSHOT_NAME, KEY_SNAP_META).map_err(read_err)?;
                // Never replace the current snapshot by an older one.
                if stored.is_none_or(|s| s.last_log_id <= meta.last_log_id) {
                    let meta_bytes = seal_json(&sealer, SNAPSHOT_NAME, KEY_SNAP_META, &meta)?;
                    snap.insert(KEY_SNAP_META, meta_bytes.as_slice())
                        .map_err(write_err)?;
                    let stored = sealer
                        .seal_borrowed(SNAPSHOT_NAME, KEY_SNAP_DATA.as_bytes(), &data)
                        .map_err(write_err)?;
                    snap.insert(KEY_SNAP_DATA, stored.as_ref())
                        .map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)?;
            Ok((meta, data))
        })
        .await?;
        tracing::info!(
            snapshot_id = %meta.snapshot_id,
            last_index = meta.last_log_id.map(|l| l.index).unwrap_or(0),
            bytes = data.len(),
            "built snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        read_applied_state(&self.db, &self.sealer).map_err(read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let db = self.db.clone();
        let sealer = self.sealer.clone();
        let retention = self.shared.event_retention;
        let held = self.events;
        let (responses, feeds, last, held) =
            blocking(move || apply_entries(&db, &sealer, entries, retention, held)).await?;
        self.events = held;
        self.shared.applied.store(last, Ordering::Release);
        for evs in feeds {
            // No receivers is fine.
            let _ = self.shared.feed.send(Feed::Entry(Arc::new(evs)));
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            sealer: self.sealer.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let meta = meta.clone();
        let db = self.db.clone();
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let bytes = data.len();
        let snapshot_id = meta.snapshot_id.clone();
        let sealer = self.sealer.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate)
                .map_err(write_err)?;
            load_snapshot(&txn, &sealer, &data).map_err(write_err)?;
            txn.delete_table(EVENTS).map_err(write_err)?;
            txn.open_table(EVENTS).map_err(write_err)?;
            {
                let mut m = txn.open_table(META).map_err(write_err)?;
                let applied = seal_json(&sealer, META_NAME, KEY_APPLIED, &meta.last_log_id)?;
                m.insert(KEY_APPLIED, applied.as_slice())
                    .map_err(write_err)?;
                let membership =
                    seal_json(&sealer, META_NAME, KEY_MEMBERSHIP, &meta.last_membership)?;
                m.insert(KEY_MEMBERSHIP, membership.as_slice())
                    .map_err(write_err)?;
                let floor = seal_json(&sealer, META_NAME, KEY_EVENTS_FLOOR, &index)?;
                m.insert(KEY_EVENTS_FLOOR, floor.as_slice())
                    .map_err(write_err)?;
                let mut snap = txn.open_table(SNAPSHOT).map_err(write_err)?;
                let meta_bytes = seal_json(&sealer, SNAPSHOT_NAME, KEY_SNAP_META, &meta)?;
                snap.insert(KEY_SNAP_META, meta_bytes.as_slice())
                    .map_err(write_err)?;
                let data = sealer
                    .seal(SNAPSHOT_NAME, KEY_SNAP_DATA.as_bytes(), data)
                    .map_err(write_err)?;
                snap.insert(KEY_SNAP_DATA, data.as_slice())
                    .map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
        .await?;
        self.shared.applied.store(index, Ordering::Release);
        // The install emptied the event history.
        self.events = 0;
        let _ = self.shared.feed.send(Feed::Reset { oldest: index });
        tracing::info!(snapshot_id = %snapshot_id, last_index = index, bytes, "installed snapshot; watchers reset");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let snap = txn.open_table(SNAPSHOT).map_err(read_err)?;
        let meta: Option<SnapshotMeta> =
            read_json(&self.sealer, &snap, SNAPSHOT_NAME, KEY_SNAP_META).map_err(read_err)?;
        let Some(meta) = meta else {
            return Ok(None);
        };
        let data = match snap.get(KEY_SNAP_DATA).map_err(read_err)? {
            Some(v) => self
                .sealer
                .open(SNAPSHOT_NAME, KEY_SNAP_DATA.as_bytes(), v.value())
                .map_err(read_err)?
                .into_owned(),
            None => return Err(read_err("snapshot meta present but data missing")),
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod event_rows_tests {
    use super::*;

    fn event(revision: u64, n: u32) -> Event {
        Event {
            revision,
            table: Table::Tasks,
            id: format!("t{revision}-{n}"),
            kind: EventKind::Created,
            value: Some(format!(r#"{{"n":{n}}}"#).into_bytes()),
            version: revision,
        }
    }

    /// Writes `row` at (`revision`, `last`) as the store does, sealed.
    fn put<T: serde::Serialize>(
        txn: &WriteTransaction,
        sealer: &Sealer,
        revision: u64,
        last: u32,
        row: &T,
    ) {
        let bytes = serde_json::to_vec(row).expect("json");
        let sealed = sealer
            .seal(EVENTS_NAME, &event_key(revision, last), bytes)
            .expect("seal");
        let mut t = txn.open_table(EVENTS).expect("table");
        t.insert((revision, last), sealed.as_slice())
            .expect("insert");
    }

    #[test]
    fn rows_of_older_stores_and_revision_rows_are_read_counted_and_pruned_alike() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = Database::create(dir.path().join("state.redb")).expect("db");
        init_tables(&db).expect("tables");
        let keys = flotilla_secrets::Keyring::generate().expect("keyring");
        let sealer = Sealer::new(Some(Arc::new(keys)));
        let txn = db.begin_write().expect("txn");
        // Revisions 1..=40 as older stores wrote them: one row per event, two events each.
        for rev in 1..=40 {
            for n in 0..2 {
                put(&txn, &sealer, rev, n, &event(rev, n));
            }
        }
        // Revisions 41..=60 as written now: one row of three events each.
        for rev in 41..=60 {
            let evs: Vec<Event> = (0..3).map(|n| event(rev, n)).collect();
            put(&txn, &sealer, rev, 2, &evs);
        }
        txn.commit().expect("commit");

        assert_eq!(count_events(&db).expect("count"), 80 + 60);
        let all = events_after(&db, &sealer, 0, 1000).expect("events");
        assert_eq!(all.len(), 140);
        let order: Vec<(u64, String)> = all.iter().map(|e| (e.revision, e.id.clone())).collect();
        let mut expected = Vec::new();
        for rev in 1..=40 {
            expected.extend((0..2).map(|n| (rev, format!("t{rev}-{n}"))));
        }
        for rev in 41..=60 {
            expected.extend((0..3).map(|n| (rev, format!("t{rev}-{n}"))));
        }
        assert_eq!(order, expected);
        // A page ends at a whole revision.
        let page = events_after(&db, &sealer, 40, 4).expect("page");
        assert_eq!(page.len(), 6);

        // Retention 10 (slack 64): 130 events must go, whole revisions: up to revision 57.
        let txn = db.begin_write().expect("txn");
        let mut count = 140;
        let floor = {
            let mut t = txn.open_table(EVENTS).expect("table");
            prune_events(&mut t, &mut count, 10).expect("prune")
        };
        txn.commit().expect("commit");
        assert_eq!(floor, Some(57));
        assert_eq!(count, 9);
        assert_eq!(count_events(&db).expect("count"), 9);
        let left = events_after(&db, &sealer, 0, 1000).expect("events");
        assert_eq!(left.first().map(|e| e.revision), Some(58));
        assert_eq!(left.len(), 9);
    }
}

#[cfg(test)]
mod added_table_tests {
    use super::*;

    /// A snapshot section as `encode_snapshot` writes it: one table with one object.
    fn section(out: &mut Vec<u8>, table: &str, id: &str, value: &[u8]) {
        out.extend_from_slice(&u16::try_from(table.len()).expect("len").to_le_bytes());
        out.extend_from_slice(table.as_bytes());
        out.extend_from_slice(&1u64.to_le_bytes());
        out.extend_from_slice(&u32::try_from(id.len()).expect("len").to_le_bytes());
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&7u64.to_le_bytes());
        out.extend_from_slice(&3u64.to_le_bytes());
        out.extend_from_slice(&u32::try_from(value.len()).expect("len").to_le_bytes());
        out.extend_from_slice(value);
    }

    fn ids(db: &Database, table: Table) -> Vec<String> {
        list(db, &Sealer::default(), table)
            .expect("list")
            .1
            .into_iter()
            .map(|v| v.id)
            .collect()
    }

    #[test]
    fn a_state_file_and_a_snapshot_from_before_the_networks_table_still_load() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = Database::create(dir.path().join("state.redb")).expect("db");
        init_tables(&db).expect("tables");
        // A file written before the table existed: drop it again.
        let txn = db.begin_write().expect("txn");
        assert!(txn.delete_table(obj_def(Table::Networks)).expect("delete"));
        txn.commit().expect("commit");
        // Opening creates it, empty.
        init_tables(&db).expect("tables again");
        assert!(ids(&db, Table::Networks).is_empty());

        // An older snapshot lists only the tables it knew.
        let mut old = SNAPSHOT_MAGIC.to_vec();
        old.extend_from_slice(&1u32.to_le_bytes());
        section(&mut old, "volumes", "v1", b"{}");
        let txn = db.begin_write().expect("txn");
        load_snapshot(&txn, &Sealer::default(), &old).expect("old snapshot");
        txn.commit().expect("commit");
        assert_eq!(ids(&db, Table::Volumes), ["v1"]);
        assert!(ids(&db, Table::Networks).is_empty());

        // A current one carries the networks section, and round-trips it.
        let mut new = SNAPSHOT_MAGIC.to_vec();
        new.extend_from_slice(&2u32.to_le_bytes());
        section(&mut new, "volumes", "v2", b"{}");
        section(&mut new, "networks", "backend", br#"{"name":"backend"}"#);
        let txn = db.begin_write().expect("txn");
        load_snapshot(&txn, &Sealer::default(), &new).expect("new snapshot");
        txn.commit().expect("commit");
        assert_eq!(ids(&db, Table::Volumes), ["v2"]);
        assert_eq!(ids(&db, Table::Networks), ["backend"]);
        let txn = db.begin_read().expect("read");
        let encoded = encode_snapshot(&txn, &Sealer::default()).expect("encode");
        drop(txn);
        let txn = db.begin_write().expect("txn");
        load_snapshot(&txn, &Sealer::default(), &encoded).expect("reload");
        txn.commit().expect("commit");
        let net = get(&db, &Sealer::default(), Table::Networks, "backend")
            .expect("get")
            .expect("present");
        assert_eq!((net.version, net.created), (7, 3));
        assert_eq!(net.value, br#"{"name":"backend"}"#);
    }
}
