//! The set of backends of one service port, and the load-balancing picker.
//!
//! **Balancing**: least-connections over the whole set (a service port has a handful of replicas, so
//! an O(n) scan of atomic counters per *connection* costs nothing next to the `connect` it
//! precedes). Ties on the lowest active count, the common case at low load, are broken by *power of
//! two choices*: two tied backends are drawn at random and the one picked **less recently** wins.
//! Comparing recency rather than lifetime totals gives round-robin-like spreading for sequential
//! clients, without sending every new connection to a freshly added backend until its totals catch
//! up; the random draw keeps concurrent pickers (many accept loops, many nodes) from stampeding on the
//! same backend as a strict round-robin cursor would.
//!
//! **Passive health**: a backend that refused or timed out is skipped for [`EJECT_FOR`] as long as
//! some other backend is not skipped; the frontends retry on another backend at once, so a task that
//! just died costs no failed request.
//!
//! **Draining**: [`Pool::set_backends`] swaps the set atomically; a backend that left stops getting
//! new connections, and its open connections (which hold a [`Lease`]) go on until they close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// How long a backend that failed a connect is skipped (when others are available).
pub const EJECT_FOR: Duration = Duration::from_secs(1);

/// One backend of a service port: a task and the address it serves on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// The task id (used in stats and logs).
    pub id: String,
    /// Where the task listens (task IP and target port).
    pub addr: SocketAddr,
}

impl Backend {
    /// Shorthand constructor.
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Self {
        Backend {
            id: id.into(),
            addr,
        }
    }
}

/// Counters of one backend, as reported by [`Pool::stats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    /// Task id.
    pub id: String,
    /// Backend address.
    pub addr: SocketAddr,
    /// Connections (TCP) or sessions (UDP) open now.
    pub active: usize,
    /// Connections or sessions ever handed to this backend.
    pub total: u64,
    /// Connect attempts that failed (refused, timed out).
    pub failed: u64,
    /// The backend was removed and only its remaining connections are kept.
    pub draining: bool,
}

pub(crate) struct Endpoint {
    backend: Backend,
    active: AtomicUsize,
    total: AtomicU64,
    failed: AtomicU64,
    /// Value of the pool's pick sequence when this endpoint was last chosen (0 = never).
    last_pick: AtomicU64,
    /// Milliseconds since the pool's epoch until which the endpoint is skipped (0 = not ejected).
    ejected_until_ms: AtomicU64,
    draining: AtomicBool,
}

impl Endpoint {
    fn new(backend: Backend) -> Self {
        Endpoint {
            backend,
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_pick: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            id: self.backend.id.clone(),
            addr: self.backend.addr,
            active: self.active.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            draining: self.draining.load(Ordering::Relaxed),
        }
    }
}

struct PoolInner {
    live: RwLock<Arc<[Arc<Endpoint>]>>,
    /// Removed endpoints that still had connections when they were removed (for stats).
    draining: Mutex<Vec<Arc<Endpoint>>>,
    seq: AtomicU64,
    epoch: tokio::time::Instant,
}

/// A shared, cheaply cloneable set of backends for one service port.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("backends", &self.backends())
            .finish()
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// A backend chosen for one connection or session. Counts as active on its backend until dropped.
pub struct Lease {
    ep: Arc<Endpoint>,
    pool: Pool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lease").field(&self.ep.backend).finish()
    }
}

impl Lease {
    /// The chosen backend's address.
    pub fn addr(&self) -> SocketAddr {
        self.ep.backend.addr
    }

    /// The chosen backend's task id.
    pub fn id(&self) -> &str {
        &self.ep.backend.id
    }

    /// Records a failed connect: counts it and skips the backend for [`EJECT_FOR`].
    pub fn mark_failed(&self) {
        self.ep.failed.fetch_add(1, Ordering::Relaxed);
        let until = self.pool.now_ms() + EJECT_FOR.as_millis() as u64;
        self.ep.ejected_until_ms.store(until, Ordering::Relaxed);
    }

    /// Records a successful connect: lifts any ejection at once.
    pub fn mark_ok(&self) {
        if self.ep.ejected_until_ms.load(Ordering::Relaxed) != 0 {
            self.ep.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Identity of the chosen endpoint (for excluding it from a retry).
    pub(crate) fn key(&self) -> usize {
        Arc::as_ptr(&self.ep) as usize
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ep.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Load seen by the picker for one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Load {
    pub active: usize,
    pub last_pick: u64,
}

/// The pure picking rule (see the module docs): index of the chosen candidate, `None` if empty.
/// `draw(n)` returns a uniformly random index below `n`.
pub(crate) fn choose(loads: &[Load], mut draw: impl FnMut(usize) -> usize) -> Option<usize> {
    let min = loads.iter().map(|l| l.active).min()?;
    let tied: Vec<usize> = (0..loads.len())
        .filter(|&i| loads[i].active == min)
        .collect();
    match tied.len() {
        0 => None,
        1 => Some(tied[0]),
        n => {
            let a = draw(n);
            let mut b = draw(n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (tied[a], tied[b]);
            Some(if loads[b].last_pick < loads[a].last_pick {
                b
            } else {
                a
            })
        }
    }
}

impl Pool {
    /// A pool with these backends.
    pub fn new(backends: Vec<Backend>) -> Self {
        let pool = Pool {
            inner: Arc::new(PoolInner {
                live: RwLock::new(Arc::from(Vec::new())),
                draining: Mutex::new(Vec::new()),
                seq: AtomicU64::new(1),
                epoch: tokio::time::Instant::now(),
            }),
        };
        pool.set_backends(backends);
        pool
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "not ejected".
        self.inner.epoch.elapsed().as_millis() as u64 + 1
    }

    fn snapshot(&self) -> Arc<[Arc<Endpoint>]> {
        match self.inner.live.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the set atomically. Backends are identified by `(id, addr)`: one that stays keeps
    /// its counters; one that leaves drains (no new connections, open ones continue).
    pub fn set_backends(&self, backends: Vec<Backend>) {
        let old = self.snapshot();
        let mut draining = match self.inner.draining.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(backends.len());
        for b in backends {
            if next.iter().any(|e| e.backend == b) {
                continue;
            }
            let ep = if let Some(e) = old.iter().find(|e| e.backend == b) {
                e.clone()
            } else if let Some(i) = draining.iter().position(|e| e.backend == b) {
                let e = draining.swap_remove(i);
                e.draining.store(false, Ordering::Relaxed);
                e
            } else {
                Arc::new(Endpoint::new(b))
            };
            next.push(ep);
        }
        for e in old.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, e)) {
                e.draining.store(true, Ordering::Relaxed);
                draining.push(e.clone());
            }
        }
        draining.retain(|e| e.active.load(Ordering::Acquire) > 0);
        let next: Arc<[Arc<Endpoint>]> = Arc::from(next);
        match self.inner.live.write() {
            Ok(mut g) => *g = next,
            Err(p) => *p.into_inner() = next,
        }
    }

    /// The current (non-draining) backends.
    pub fn backends(&self) -> Vec<Backend> {
        self.snapshot().iter().map(|e| e.backend.clone()).collect()
    }

    /// Chooses a backend for a new connection or session (see the module docs). `None` when the
    /// pool is empty.
    pub fn pick(&self) -> Option<Lease> {
        self.pick_excluding(&[])
    }

    /// Like [`Pool::pick`], skipping the endpoints in `exclude` (already tried by this connection).
    pub(crate) fn pick_excluding(&self, exclude: &[usize]) -> Option<Lease> {
        let all = self.snapshot();
        let now = self.now_ms();
        let not_excluded = |e: &&Arc<Endpoint>| !exclude.contains(&(Arc::as_ptr(e) as usize));
        let mut cands: Vec<&Arc<Endpoint>> = all
            .iter()
            .filter(not_excluded)
            .filter(|e| e.ejected_until_ms.load(Ordering::Relaxed) <= now)
            .collect();
        if cands.is_empty() {
            // Everyone failed recently: trying one beats failing the client outright.
            cands = all.iter().filter(not_excluded).collect();
        }
        let loads: Vec<Load> = cands
            .iter()
            .map(|e| Load {
                active: e.active.load(Ordering::Acquire),
                last_pick: e.last_pick.load(Ordering::Relaxed),
            })
            .collect();
        let mut rng = rand::rng();
        let i = choose(&loads, |n| rng.random_range(0..n))?;
        let ep = Arc::clone(cands[i]);
        ep.last_pick.store(
            self.inner.seq.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        ep.active.fetch_add(1, Ordering::AcqRel);
        ep.total.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            ep,
            pool: self.clone(),
        })
    }

    /// Counters of every backend, live ones first, then draining ones that still have connections.
    pub fn stats(&self) -> Vec<BackendStats> {
        let mut out: Vec<BackendStats> = self.snapshot().iter().map(|e| e.stats()).collect();
        let mut draining = match self.inner.draining.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        draining.retain(|e| e.active.load(Ordering::Acquire) > 0);
        out.extend(draining.iter().map(|e| e.stats()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn load(active: usize, last_pick: u64) -> Load {
        Load { active, last_pick }
    }

    #[test]
    fn choose_prefers_least_active() {
        let loads = [load(3, 0), load(0, 9), load(2, 0)];
        for d in 0..3 {
            assert_eq!(choose(&loads, |_| d % 2), Some(1));
        }
        assert_eq!(choose(&[], |_| 0), None);
    }

    #[test]
    fn choose_breaks_ties_by_recency_of_two_random() {
        // Three tied; draws pick candidates 0 and 2 (draw(3)=0, draw(2)=1 -> 2).
        let loads = [load(0, 5), load(0, 1), load(0, 3)];
        let mut draws = [0usize, 1].into_iter();
        assert_eq!(choose(&loads, |_| draws.next().unwrap_or(0)), Some(2));
        // Draws 1 and 0: candidate 1 is the least recently picked.
        let mut draws = [1usize, 0].into_iter();
        assert_eq!(choose(&loads, |_| draws.next().unwrap_or(0)), Some(1));
    }

    #[tokio::test]
    async fn sequential_picks_spread_evenly() {
        let pool = Pool::new(
            (0..3)
                .map(|i| Backend::new(format!("t{i}"), addr(1000 + i)))
                .collect(),
        );
        for _ in 0..300 {
            drop(pool.pick().expect("pick"));
        }
        for s in pool.stats() {
            assert!((70..=130).contains(&s.total), "{s:?}");
        }
    }

    #[tokio::test]
    async fn least_connections_goes_to_idle() {
        let pool = Pool::new(
            (0..3)
                .map(|i| Backend::new(format!("t{i}"), addr(1000 + i)))
                .collect(),
        );
        let a = pool.pick().expect("pick");
        let b = pool.pick().expect("pick");
        let c = pool.pick().expect("pick");
        let ids: std::collections::HashSet<_> = [a.id(), b.id(), c.id()].into_iter().collect();
        assert_eq!(ids.len(), 3, "one each");
        let idle = b.id().to_string();
        drop(b);
        for _ in 0..20 {
            let l = pool.pick().expect("pick");
            assert_eq!(l.id(), idle);
        }
    }

    #[tokio::test]
    async fn removed_backend_drains_and_ejected_backend_is_skipped() {
        let pool = Pool::new(vec![Backend::new("a", addr(1)), Backend::new("b", addr(2))]);
        let mut held = Vec::new();
        while held.len() < 2 {
            held.push(pool.pick().expect("pick"));
        }
        pool.set_backends(vec![Backend::new("b", addr(2))]);
        let stats = pool.stats();
        assert_eq!(stats.len(), 2);
        assert!(stats
            .iter()
            .any(|s| s.id == "a" && s.draining && s.active == 1));
        for _ in 0..5 {
            assert_eq!(pool.pick().expect("pick").id(), "b");
        }
        held.clear();
        assert_eq!(pool.stats().len(), 1, "drained backend forgotten");

        // Ejection: "b" failed, "c" is preferred while "b" is ejected, "b" is used if alone.
        pool.set_backends(vec![Backend::new("b", addr(2)), Backend::new("c", addr(3))]);
        let l = pool.pick().expect("pick");
        let failed_id = l.id().to_string();
        l.mark_failed();
        drop(l);
        for _ in 0..5 {
            assert_ne!(pool.pick().expect("pick").id(), failed_id);
        }
        let l = pool.pick().expect("pick");
        let only = pool
            .pick_excluding(&[l.key()])
            .expect("ejected backend still used when alone");
        assert_eq!(only.id(), failed_id);
    }
}
