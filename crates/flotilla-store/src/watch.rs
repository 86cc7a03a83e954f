//! The change feed consumer.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use redb::Database;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::at_rest::Sealer;
use crate::error::StoreError;
use crate::state_machine::{self, Feed};
use crate::types::Event;

/// How many retained events a watcher reads from disk at a time.
const REPLAY_PAGE: usize = 1024;

/// A stream of [`Event`]s with revision greater than the revision it was created from: first
/// replayed from the retained history on disk, then live.
///
/// Ends with `Some(Err(StoreError::Compacted { oldest }))` when it cannot continue without a
/// gap (the start revision is older than the retained history, a snapshot install replaced
/// the state, or the watcher fell so far behind that the history it missed was pruned); the
/// consumer should relist ([`crate::Store::list_at`]) and watch again from the listed
/// revision. After an error, or once the store is gone, `next` returns `None`.
///
/// A slow watcher that overflows the live channel does not miss events: it transparently
/// re-reads them from disk while they are retained.
pub struct Watch {
    db: Weak<Database>,
    sealer: Sealer,
    rx: broadcast::Receiver<Feed>,
    /// Highest revision already queued or delivered.
    last: u64,
    buf: VecDeque<Event>,
    replay: bool,
    done: bool,
}

impl Watch {
    pub(crate) fn new(
        db: &Arc<Database>,
        sealer: Sealer,
        rx: broadcast::Receiver<Feed>,
        from: u64,
    ) -> Watch {
        Watch {
            db: Arc::downgrade(db),
            sealer,
            rx,
            last: from,
            buf: VecDeque::new(),
            replay: true,
            done: false,
        }
    }

    /// The highest revision delivered or queued so far (the start revision initially).
    pub fn revision(&self) -> u64 {
        self.last
    }

    /// Waits for the next event. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Option<Result<Event, StoreError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(ev) = self.buf.pop_front() {
                return Some(Ok(ev));
            }
            if self.replay {
                let Some(db) = self.db.upgrade() else {
                    self.done = true;
                    return None;
                };
                match state_machine::events_after(&db, &self.sealer, self.last, REPLAY_PAGE) {
                    Ok(events) => {
                        // A full page: more history may follow, read it on the next round.
                        self.replay = events.len() >= REPLAY_PAGE;
                        if let Some(ev) = events.last() {
                            self.last = ev.revision;
                        }
                        self.buf.extend(events);
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            match self.rx.recv().await {
                Ok(Feed::Entry(events)) => {
                    let rev = events.first().map(|e| e.revision).unwrap_or(0);
                    if rev > self.last {
                        self.last = rev;
                        self.buf.extend(events.iter().cloned());
                    }
                }
                Ok(Feed::Reset { oldest }) => {
                    self.done = true;
                    return Some(Err(StoreError::Compacted { oldest }));
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(
                        skipped = n,
                        from = self.last,
                        "watcher lagged; replaying from disk"
                    );
                    self.replay = true;
                }
                Err(RecvError::Closed) => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}
