//! The Raft log store on redb (`raft-log.redb`).
//!
//! Every mutation (append, truncate, purge, vote, committed index) is one redb write
//! transaction committed with `Durability::Immediate` (fsync) before openraft is told it is
//! done; for `append` the `LogFlushed` callback fires only after the commit returned.
//!
//! With a keyring every value is sealed ([`crate::at_rest`]): entries with AAD
//! `"log\0" + index (u64 BE)`, meta values with `"meta\0" + key`.
//!
//! The most recently appended entries also stay in memory ([`Recent`], at most
//! [`RECENT_MAX_BYTES`]): openraft reads each entry back once to apply it and, on the leader,
//! once per follower to replicate it, and those reads are served from there instead of
//! reading, opening and parsing the entry again. The cache holds only what the log file holds
//! (updated after each append commits, before truncate and purge change the file).

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::at_rest::{copy_table, count_plain, durable_write, Sealer};
use crate::raft_types::{
    blocking, read_err, write_err, Entry, LogId, StorageError, TypeConfig, Vote,
};

/// index → JSON-encoded entry.
const LOG_NAME: &str = "log";
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new(LOG_NAME);
/// "vote" | "committed" | "purged" → JSON.
const META_NAME: &str = "meta";
const META: TableDefinition<&str, &[u8]> = TableDefinition::new(META_NAME);

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "purged";

/// Most bytes (about) of entries [`Recent`] keeps.
const RECENT_MAX_BYTES: usize = 32 << 20;
/// Most entries [`Recent`] keeps.
const RECENT_MAX_ENTRIES: usize = 4096;

#[derive(Clone)]
pub(crate) struct LogStore {
    db: Arc<Database>,
    /// Last committed index persisted (for status); shared with the `Store`.
    committed: Arc<AtomicU64>,
    sealer: Sealer,
    /// The last entries appended, shared by the store and its readers.
    recent: Arc<Mutex<Recent>>,
}

/// The last entries appended to the log file, consecutive and ending at its last entry.
#[derive(Default)]
pub(crate) struct Recent {
    entries: VecDeque<Entry>,
    bytes: usize,
}

fn entry_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(batch) => 64 + batch.approx_size(),
        _ => 256,
    }
}

impl Recent {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries just committed to the file (consecutive, ascending).
    fn push(&mut self, entries: Vec<Entry>) {
        for entry in entries {
            let index = entry.log_id.index;
            if let Some(first) = self.first_index() {
                if index <= first {
                    self.clear();
                } else {
                    self.truncate(index);
                    let next = first + self.entries.len() as u64;
                    if index != next {
                        // A gap: the cache would no longer be consecutive.
                        self.clear();
                    }
                }
            }
            self.bytes += entry_bytes(&entry);
            self.entries.push_back(entry);
        }
        while self.bytes > RECENT_MAX_BYTES || self.entries.len() > RECENT_MAX_ENTRIES {
            match self.entries.pop_front() {
                Some(e) => self.bytes = self.bytes.saturating_sub(entry_bytes(&e)),
                None => break,
            }
        }
    }

    /// Drops the entries from `index` on.
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|e| e.log_id.index >= index) {
            if let Some(e) = self.entries.pop_back() {
                self.bytes = self.bytes.saturating_sub(entry_bytes(&e));
            }
        }
    }

    /// Drops the entries up to `index` included.
    fn purge(&mut self, index: u64) {
        while self
            .entries
            .front()
            .is_some_and(|e| e.log_id.index <= index)
        {
            if let Some(e) = self.entries.pop_front() {
                self.bytes = self.bytes.saturating_sub(entry_bytes(&e));
            }
        }
    }

    /// The entries of `range` if the cache holds all of them (the range ends at or before the
    /// last entry; an unbounded end is not served).
    fn get(&self, range: &(Bound<u64>, Bound<u64>)) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let start = match range.0 {
            Bound::Included(s) => s,
            Bound::Excluded(s) => s.checked_add(1)?,
            Bound::Unbounded => return None,
        };
        let end = match range.1 {
            Bound::Included(e) => e.checked_add(1)?,
            Bound::Excluded(e) => e,
            Bound::Unbounded => return None,
        };
        let next = first + self.entries.len() as u64;
        if start < first || end > next || start >= end {
            return None;
        }
        let from = usize::try_from(start - first).ok()?;
        let to = usize::try_from(end - first).ok()?;
        Some(self.entries.range(from..to).cloned().collect())
    }
}

/// Encodes and seals one entry for the log table.
fn encode_entry(sealer: &Sealer, entry: &Entry) -> Result<(u64, Vec<u8>), StorageError> {
    let index = entry.get_log_id().index;
    let mut buf = sealer.buffer(entry_size_hint(entry));
    serde_json::to_writer(&mut buf, entry).map_err(write_err)?;
    let stored = sealer
        .seal_buf(LOG_NAME, &index.to_be_bytes(), buf)
        .map_err(write_err)?;
    Ok((index, stored))
}

/// About the JSON size of `entry`, to size its buffer once.
fn entry_size_hint(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(batch) => {
            128 + batch.approx_size() + batch.approx_size() / 8
        }
        _ => 256,
    }
}

fn decode_entry(sealer: &Sealer, index: u64, stored: &[u8]) -> Result<Entry, StorageError> {
    let bytes = sealer
        .open(LOG_NAME, &index.to_be_bytes(), stored)
        .map_err(read_err)?;
    serde_json::from_slice(&bytes).map_err(read_err)
}

/// Counts the plain values of a log file (for the upgrade to encryption at rest).
pub(crate) fn count_plain_values(db: &Database) -> Result<u64, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    Ok(count_plain!(txn, LOG) + count_plain!(txn, META))
}

/// Copies a log file sealing every plain value (the upgrade to encryption at rest).
pub(crate) fn copy_sealed(src: &Database, dst: &Database, sealer: &Sealer) -> Result<u64, String> {
    let from = src.begin_read().map_err(|e| e.to_string())?;
    let txn = durable_write(dst)?;
    let mut n = 0;
    {
        n += copy_table!(from, txn, LOG, LOG_NAME, sealer, |k| k.to_be_bytes());
        n += copy_table!(from, txn, META, META_NAME, sealer, |k| k.as_bytes());
    }
    txn.commit().map_err(|e| e.to_string())?;
    Ok(n)
}

impl LogStore {
    /// Wraps an open database, creating the tables if needed.
    pub(crate) fn new(db: Arc<Database>, sealer: Sealer) -> Result<LogStore, StorageError> {
        let txn = db.begin_write().map_err(write_err)?;
        {
            txn.open_table(LOG).map_err(write_err)?;
            txn.open_table(META).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)?;
        let store = LogStore {
            db,
            committed: Arc::new(AtomicU64::new(0)),
            sealer,
            recent: Arc::default(),
        };
        let committed = store.read_committed_sync()?;
        store
            .committed
            .store(committed.map(|c| c.index).unwrap_or(0), Ordering::Relaxed);
        Ok(store)
    }

    pub(crate) fn committed_handle(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn recent(&self) -> MutexGuard<'_, Recent> {
        // Every update leaves the cache consistent between statements that can panic.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(v) => {
                let bytes = self
                    .sealer
                    .open(META_NAME, key.as_bytes(), v.value())
                    .map_err(read_err)?;
                Ok(Some(serde_json::from_slice(&bytes).map_err(read_err)?))
            }
            None => Ok(None),
        }
    }

    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        value: &T,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        let bytes = self
            .sealer
            .seal(META_NAME, key.as_bytes(), bytes)
            .map_err(write_err)?;
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate)
                .map_err(write_err)?;
            {
                let mut table = txn.open_table(META).map_err(write_err)?;
                table.insert(key, bytes.as_slice()).map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
        .await
    }

    /// Test helper: appends entries without a flush callback.
    #[cfg(test)]
    pub(crate) fn append_for_test(&self, entries: &[Entry]) -> Result<(), StorageError> {
        self.recent().clear();
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = txn.open_table(LOG).map_err(write_err)?;
            for e in entries {
                let (index, bytes) = encode_entry(&self.sealer, e)?;
                table.insert(index, bytes.as_slice()).map_err(write_err)?;
            }
        }
        txn.commit().map_err(write_err)
    }

    /// Reads entries in `range` (used by openraft and by force-new-cluster recovery).
    pub(crate) fn read_range(
        &self,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<Entry>, StorageError> {
        if let Some(entries) = self.recent().get(&range) {
            return Ok(entries);
        }
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in table.range(range).map_err(read_err)? {
            let (k, v) = item.map_err(read_err)?;
            out.push(decode_entry(&self.sealer, k.value(), v.value())?);
        }
        Ok(out)
    }

    pub(crate) fn read_committed_sync(&self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_range((range.start_bound().cloned(), range.end_bound().cloned()))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(KEY_PURGED)?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOG).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((k, v)) => Some(*decode_entry(&self.sealer, k.value(), v.value())?.get_log_id()),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(KEY_COMMITTED, &committed).await?;
        self.committed
            .store(committed.map(|c| c.index).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.read_committed_sync()
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let db = self.db.clone();
        let sealer = self.sealer.clone();
        let res = blocking(move || {
            // Encoding and sealing (up to `max_batch_bytes` per entry) off the async threads.
            let encoded = entries
                .iter()
                .map(|e| encode_entry(&sealer, e))
                .collect::<Result<Vec<_>, _>>()?;
            let mut txn = db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate)
                .map_err(write_err)?;
            {
                let mut table = txn.open_table(LOG).map_err(write_err)?;
                for (index, bytes) in &encoded {
                    table.insert(*index, bytes.as_slice()).map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)?;
            Ok(entries)
        })
        .await;
        match res {
            Ok(entries) => {
                // Only now is the data on disk.
                self.recent().push(entries);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                self.recent().clear();
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(since = log_id.index, "truncating raft log");
        self.recent().truncate(log_id.index);
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate)
                .map_err(write_err)?;
            {
                let mut table = txn.open_table(LOG).map_err(write_err)?;
                table
                    .retain_in(log_id.index.., |_, _| false)
                    .map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(upto = log_id.index, "purging raft log");
        self.recent().purge(log_id.index);
        let purged = serde_json::to_vec(&log_id).map_err(write_err)?;
        let purged = self
            .sealer
            .seal(META_NAME, KEY_PURGED.as_bytes(), purged)
            .map_err(write_err)?;
        let db = self.db.clone();
        blocking(move || {
            let mut txn = db.begin_write().map_err(write_err)?;
            txn.set_durability(Durability::Immediate)
                .map_err(write_err)?;
            {
                let mut meta = txn.open_table(META).map_err(write_err)?;
                meta.insert(KEY_PURGED, purged.as_slice())
                    .map_err(write_err)?;
                let mut table = txn.open_table(LOG).map_err(write_err)?;
                table
                    .retain_in(..=log_id.index, |_, _| false)
                    .map_err(write_err)?;
            }
            txn.commit().map_err(write_err)
        })
        .await
    }
}

#[cfg(test)]
mod recent_tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    fn ids(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    fn range(start: u64, end: u64) -> (Bound<u64>, Bound<u64>) {
        (Bound::Included(start), Bound::Excluded(end))
    }

    #[test]
    fn recent_entries_are_served_only_while_the_cache_holds_the_whole_range() {
        let mut r = Recent::default();
        assert!(r.get(&range(1, 2)).is_none());
        r.push((1..=5).map(|i| entry(1, i)).collect());
        assert_eq!(
            ids(&r.get(&range(2, 5)).expect("cached")),
            vec![(1, 2), (1, 3), (1, 4)]
        );
        let incl = (Bound::Excluded(3), Bound::Included(5));
        assert_eq!(ids(&r.get(&incl).expect("cached")), vec![(1, 4), (1, 5)]);
        // Past the end, before the start, unbounded or empty: the file answers.
        assert!(r.get(&range(4, 7)).is_none());
        assert!(r.get(&range(0, 3)).is_none());
        assert!(r.get(&(Bound::Included(2), Bound::Unbounded)).is_none());
        assert!(r.get(&range(3, 3)).is_none());

        // Truncated, then overwritten by a new term.
        r.truncate(4);
        assert!(r.get(&range(3, 5)).is_none());
        r.push(vec![entry(2, 4), entry(2, 5)]);
        assert_eq!(
            ids(&r.get(&range(3, 6)).expect("cached")),
            vec![(1, 3), (2, 4), (2, 5)]
        );
        // An append that overlaps replaces the tail.
        r.push(vec![entry(3, 5), entry(3, 6)]);
        assert_eq!(
            ids(&r.get(&range(4, 7)).expect("cached")),
            vec![(2, 4), (3, 5), (3, 6)]
        );
        // Purged entries are gone.
        r.purge(4);
        assert!(r.get(&range(4, 6)).is_none());
        assert_eq!(
            ids(&r.get(&range(5, 7)).expect("cached")),
            vec![(3, 5), (3, 6)]
        );
        // A gap or an append before the cache's start restarts it.
        r.push(vec![entry(3, 9)]);
        assert!(r.get(&range(5, 7)).is_none());
        assert_eq!(ids(&r.get(&range(9, 10)).expect("cached")), vec![(3, 9)]);
        r.push(vec![entry(4, 2)]);
        assert!(r.get(&range(9, 10)).is_none());
        assert_eq!(ids(&r.get(&range(2, 3)).expect("cached")), vec![(4, 2)]);
    }

    #[test]
    fn recent_entries_are_bounded() {
        let mut r = Recent::default();
        let n = RECENT_MAX_ENTRIES as u64 + 10;
        r.push((1..=n).map(|i| entry(1, i)).collect());
        assert_eq!(r.entries.len(), RECENT_MAX_ENTRIES);
        assert!(r.get(&range(1, 2)).is_none());
        assert!(r.get(&range(n, n + 1)).is_some());
        assert!(r.bytes <= RECENT_MAX_BYTES);
    }
}
