//! Routing: which worker gets a request.
//!
//! State kept here: per-worker approximate prefix indexes (`prefix`) and the session table
//! (session key -> worker). The decision itself is `policy::choose`.

pub mod policy;
pub mod prefix;

use crate::workers::Worker;
use policy::{Balance, Candidate, Reason};
use prefix::PrefixIndex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the router needs to know about one request.
pub struct RouteRequest<'a> {
    pub session_key: Option<&'a str>,
    pub chunk_hashes: &'a [u64],
    /// Workers already tried for this request (excluded on retry).
    pub exclude: &'a HashSet<u64>,
}

#[derive(Debug)]
pub struct Decision {
    pub worker: Arc<Worker>,
    pub reason: Reason,
    pub matched_chunks: usize,
}

#[derive(Debug)]
pub enum RouteError {
    /// No worker is healthy with a closed (or probe-ready) breaker.
    NoHealthyWorker,
    /// Healthy workers exist but all are at their in-flight limit.
    AllAtCapacity,
}

pub struct Router {
    balance: Balance,
    max_inflight: usize,
    prefix_max_entries: usize,
    indexes: Mutex<HashMap<u64, PrefixIndex>>,
    sessions: Mutex<SessionTable>,
    rotation: AtomicUsize,
}

impl Router {
    pub fn new(
        balance: Balance,
        max_inflight: usize,
        prefix_max_entries: usize,
        session_ttl: Duration,
        max_sessions: usize,
    ) -> Self {
        Self {
            balance,
            max_inflight,
            prefix_max_entries,
            indexes: Mutex::new(HashMap::new()),
            sessions: Mutex::new(SessionTable::new(session_ttl, max_sessions)),
            rotation: AtomicUsize::new(0),
        }
    }

    /// Choose a worker among `workers` and record the affinity (prefix chunks and session) it creates.
    pub fn route(&self, workers: &[Arc<Worker>], req: &RouteRequest<'_>) -> Result<Decision, RouteError> {
        let now = Instant::now();
        let usable: Vec<&Arc<Worker>> =
            workers.iter().filter(|w| !req.exclude.contains(&w.id) && w.is_routable(now)).collect();
        if usable.is_empty() {
            return Err(RouteError::NoHealthyWorker);
        }
        let with_room: Vec<&Arc<Worker>> = usable.into_iter().filter(|w| w.in_flight() < self.max_inflight).collect();
        if with_room.is_empty() {
            return Err(RouteError::AllAtCapacity);
        }
        let cands: Vec<Candidate> = {
            let indexes = self.indexes.lock().expect("prefix index lock");
            with_room
                .iter()
                .map(|w| Candidate {
                    id: w.id,
                    load: w.in_flight(),
                    matched_chunks: indexes.get(&w.id).map_or(0, |ix| ix.matched_chunks(req.chunk_hashes)),
                })
                .collect()
        };
        let sticky = req.session_key.and_then(|k| self.sessions.lock().expect("session lock").get(k, now));
        let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
        let (id, reason) = policy::choose(&cands, sticky, self.balance, rotation).ok_or(RouteError::NoHealthyWorker)?;
        let matched_chunks = cands.iter().find(|c| c.id == id).map_or(0, |c| c.matched_chunks);
        let worker = Arc::clone(with_room.into_iter().find(|w| w.id == id).expect("chosen from candidates"));

        self.indexes
            .lock()
            .expect("prefix index lock")
            .entry(id)
            .or_insert_with(|| PrefixIndex::new(self.prefix_max_entries))
            .insert(req.chunk_hashes);
        if let Some(k) = req.session_key {
            self.sessions.lock().expect("session lock").set(k, id, now);
        }
        Ok(Decision { worker, reason, matched_chunks })
    }

    /// Forget everything about a removed worker.
    pub fn forget_worker(&self, id: u64) {
        self.indexes.lock().expect("prefix index lock").remove(&id);
        self.sessions.lock().expect("session lock").forget_worker(id);
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("session lock").map.len()
    }
}

/// Session key -> (worker, last use), bounded by TTL and size.
struct SessionTable {
    map: HashMap<String, (u64, Instant)>,
    ttl: Duration,
    max: usize,
}

impl SessionTable {
    fn new(ttl: Duration, max: usize) -> Self {
        Self { map: HashMap::new(), ttl, max: max.max(1) }
    }

    fn get(&self, key: &str, now: Instant) -> Option<u64> {
        self.map.get(key).filter(|(_, t)| now.duration_since(*t) < self.ttl).map(|(w, _)| *w)
    }

    fn set(&mut self, key: &str, worker: u64, now: Instant) {
        self.map.insert(key.to_string(), (worker, now));
        if self.map.len() > self.max {
            let ttl = self.ttl;
            self.map.retain(|_, (_, t)| now.duration_since(*t) < ttl);
        }
        if self.map.len() > self.max {
            // Still full of live sessions: drop the older half.
            let mut ages: Vec<Instant> = self.map.values().map(|(_, t)| *t).collect();
            ages.sort_unstable();
            let cutoff = ages[ages.len() / 2];
            self.map.retain(|_, (_, t)| *t > cutoff);
        }
    }

    fn forget_worker(&mut self, worker: u64) {
        self.map.retain(|_, (w, _)| *w != worker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerSource;

    fn pool(n: usize) -> Vec<Arc<Worker>> {
        (0..n)
            .map(|i| {
                Arc::new(Worker::new(
                    i as u64 + 1,
                    format!("http://127.0.0.1:{}", 9000 + i),
                    WorkerSource::Static,
                    5,
                    Duration::from_secs(5),
                ))
            })
            .collect()
    }

    fn router() -> Router {
        Router::new(Balance { abs_threshold: 2, rel_threshold: 1.5 }, 4, 10_000, Duration::from_secs(60), 100)
    }

    fn hashes(seed: u32, chunks: usize) -> Vec<u64> {
        let ids: Vec<u32> = (0..(chunks * 128) as u32).map(|i| i ^ seed.wrapping_mul(7919)).collect();
        prefix::chunk_hashes(&ids, 128, &[])
    }

    #[test]
    fn same_prefix_returns_to_same_worker() {
        let (r, ws, none) = (router(), pool(3), HashSet::new());
        let h = hashes(1, 4);
        let first = r.route(&ws, &RouteRequest { session_key: None, chunk_hashes: &h[..2], exclude: &none }).unwrap();
        assert_eq!(first.reason, Reason::Load);
        let again = r.route(&ws, &RouteRequest { session_key: None, chunk_hashes: &h, exclude: &none }).unwrap();
        assert_eq!(again.worker.id, first.worker.id);
        assert_eq!(again.reason, Reason::Prefix);
        assert_eq!(again.matched_chunks, 2);
    }

    #[test]
    fn session_is_sticky_and_retry_excludes_tried_worker() {
        let (r, ws, none) = (router(), pool(2), HashSet::new());
        let a = r.route(&ws, &RouteRequest { session_key: Some("s1"), chunk_hashes: &[], exclude: &none }).unwrap();
        for _ in 0..3 {
            let b = r.route(&ws, &RouteRequest { session_key: Some("s1"), chunk_hashes: &[], exclude: &none }).unwrap();
            assert_eq!((b.worker.id, b.reason), (a.worker.id, Reason::Session));
        }
        let tried: HashSet<u64> = [a.worker.id].into();
        let c = r.route(&ws, &RouteRequest { session_key: Some("s1"), chunk_hashes: &[], exclude: &tried }).unwrap();
        assert_ne!(c.worker.id, a.worker.id);
    }

    #[test]
    fn unhealthy_and_full_workers_are_refused_with_distinct_errors() {
        let (r, ws, none) = (router(), pool(2), HashSet::new());
        let req = RouteRequest { session_key: None, chunk_hashes: &[], exclude: &none };
        for w in &ws {
            for _ in 0..4 {
                w.begin_request();
            }
        }
        assert!(matches!(r.route(&ws, &req), Err(RouteError::AllAtCapacity)));
        for w in &ws {
            w.set_healthy(false);
        }
        assert!(matches!(r.route(&ws, &req), Err(RouteError::NoHealthyWorker)));
    }

    #[test]
    fn load_spreads_cold_requests() {
        let (r, ws, none) = (router(), pool(3), HashSet::new());
        let mut seen = HashSet::new();
        for i in 0..3 {
            let h = hashes(100 + i, 1);
            let d = r.route(&ws, &RouteRequest { session_key: None, chunk_hashes: &h, exclude: &none }).unwrap();
            d.worker.begin_request(); // keep it in flight
            seen.insert(d.worker.id);
        }
        assert_eq!(seen.len(), 3, "three cold requests land on three idle workers");
    }

    #[test]
    fn forgetting_a_worker_drops_its_affinity() {
        let (r, ws, none) = (router(), pool(2), HashSet::new());
        let h = hashes(5, 3);
        let a = r.route(&ws, &RouteRequest { session_key: Some("k"), chunk_hashes: &h, exclude: &none }).unwrap();
        r.forget_worker(a.worker.id);
        assert_eq!(r.session_count(), 0);
        let rest: Vec<Arc<Worker>> = ws.iter().filter(|w| w.id != a.worker.id).cloned().collect();
        let b = r.route(&rest, &RouteRequest { session_key: Some("k"), chunk_hashes: &h, exclude: &none }).unwrap();
        assert_eq!(b.reason, Reason::Load);
    }
}
