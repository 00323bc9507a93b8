//! The worker set: SGLang servers the gateway routes to, their health, load and circuit breakers.
//!
//! Workers come from the command line (static), the admin API, or Kubernetes discovery; the
//! source is remembered so that discovery only removes workers it added.

pub mod breaker;
pub mod client;
pub mod health;
pub mod kubernetes;

use breaker::CircuitBreaker;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerSource {
    Static,
    Admin,
    Kubernetes,
}

#[derive(Debug)]
pub struct Worker {
    pub id: u64,
    /// Base URL without a trailing slash.
    pub url: String,
    pub source: WorkerSource,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    health_failures: AtomicU32,
    breaker: Mutex<CircuitBreaker>,
    /// Load the worker itself reports (/v1/loads): running and waiting requests, all clients.
    reported_running: AtomicUsize,
    reported_waiting: AtomicUsize,
    requests_total: AtomicU64,
}

/// A snapshot for the admin API and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub id: u64,
    pub url: String,
    pub source: WorkerSource,
    pub healthy: bool,
    pub breaker_open: bool,
    pub in_flight: usize,
    pub reported_running: usize,
    pub reported_waiting: usize,
    pub requests_total: u64,
}

impl Worker {
    pub fn new(id: u64, url: String, source: WorkerSource, breaker_threshold: u32, breaker_open_for: Duration) -> Self {
        Self {
            id,
            url: url.trim_end_matches('/').to_string(),
            source,
            in_flight: AtomicUsize::new(0),
            // Optimistic until the first health check says otherwise: a freshly added worker
            // takes traffic at once, and the breaker guards against a dead one.
            healthy: AtomicBool::new(true),
            health_failures: AtomicU32::new(0),
            breaker: Mutex::new(CircuitBreaker::new(breaker_threshold, breaker_open_for)),
            reported_running: AtomicUsize::new(0),
            reported_waiting: AtomicUsize::new(0),
            requests_total: AtomicU64::new(0),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn begin_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end_request(&self) {
        // Saturating: never wrap below zero even if a guard is dropped twice by mistake.
        let _ = self.in_flight.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(1)));
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
        if healthy {
            self.health_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Record one failed health check; returns true when it crossed `threshold` (now unhealthy).
    pub fn health_check_failed(&self, threshold: u32) -> bool {
        let n = self.health_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold.max(1) {
            self.healthy.store(false, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Healthy and the breaker would admit a request now.
    pub fn is_routable(&self, now: Instant) -> bool {
        self.is_healthy() && self.breaker.lock().expect("breaker lock").is_available(now)
    }

    pub fn try_acquire_breaker(&self, now: Instant) -> bool {
        self.breaker.lock().expect("breaker lock").try_acquire(now)
    }

    pub fn record_success(&self) {
        self.breaker.lock().expect("breaker lock").record_success();
    }

    pub fn record_failure(&self) {
        self.breaker.lock().expect("breaker lock").record_failure(Instant::now());
    }

    pub fn breaker_open(&self) -> bool {
        self.breaker.lock().expect("breaker lock").is_open()
    }

    pub fn set_reported_load(&self, running: usize, waiting: usize) {
        self.reported_running.store(running, Ordering::Relaxed);
        self.reported_waiting.store(waiting, Ordering::Relaxed);
    }

    pub fn info(&self) -> WorkerInfo {
        WorkerInfo {
            id: self.id,
            url: self.url.clone(),
            source: self.source,
            healthy: self.is_healthy(),
            breaker_open: self.breaker_open(),
            in_flight: self.in_flight(),
            reported_running: self.reported_running.load(Ordering::Relaxed),
            reported_waiting: self.reported_waiting.load(Ordering::Relaxed),
            requests_total: self.requests_total.load(Ordering::Relaxed),
        }
    }
}

/// Holds a worker's in-flight slot for the life of one upstream request.
pub struct InFlight(pub Arc<Worker>);

impl InFlight {
    pub fn new(worker: Arc<Worker>) -> Self {
        worker.begin_request();
        Self(worker)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// The current worker set. Readers take a cheap snapshot (a Vec of Arcs).
pub struct WorkerPool {
    workers: RwLock<Vec<Arc<Worker>>>,
    next_id: AtomicU64,
    breaker_threshold: u32,
    breaker_open_for: Duration,
}

impl WorkerPool {
    pub fn new(breaker_threshold: u32, breaker_open_for: Duration) -> Self {
        Self { workers: RwLock::new(Vec::new()), next_id: AtomicU64::new(1), breaker_threshold, breaker_open_for }
    }

    pub fn snapshot(&self) -> Vec<Arc<Worker>> {
        self.workers.read().expect("pool lock").clone()
    }

    /// Add a worker; returns it, or the existing one when the URL is already present.
    pub fn add(&self, url: &str, source: WorkerSource) -> (Arc<Worker>, bool) {
        let url = url.trim_end_matches('/');
        let mut ws = self.workers.write().expect("pool lock");
        if let Some(w) = ws.iter().find(|w| w.url == url) {
            return (Arc::clone(w), false);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let w = Arc::new(Worker::new(id, url.to_string(), source, self.breaker_threshold, self.breaker_open_for));
        ws.push(Arc::clone(&w));
        (w, true)
    }

    /// Remove by URL; in-flight requests on it finish normally (they hold their own Arc).
    pub fn remove(&self, url: &str) -> Option<Arc<Worker>> {
        let url = url.trim_end_matches('/');
        let mut ws = self.workers.write().expect("pool lock");
        let pos = ws.iter().position(|w| w.url == url)?;
        Some(ws.remove(pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_add_is_idempotent_and_remove_by_url() {
        let p = WorkerPool::new(3, Duration::from_secs(1));
        let (a, new_a) = p.add("http://127.0.0.1:1/", WorkerSource::Static);
        let (b, new_b) = p.add("http://127.0.0.1:1", WorkerSource::Admin);
        assert!(new_a && !new_b);
        assert_eq!(a.id, b.id);
        assert_eq!(p.snapshot().len(), 1);
        assert!(p.remove("http://127.0.0.1:1").is_some());
        assert!(p.remove("http://127.0.0.1:1").is_none());
    }

    #[test]
    fn in_flight_guard_counts_and_health_threshold() {
        let w = Arc::new(Worker::new(1, "http://x:1".into(), WorkerSource::Static, 3, Duration::from_secs(1)));
        {
            let _g1 = InFlight::new(Arc::clone(&w));
            let _g2 = InFlight::new(Arc::clone(&w));
            assert_eq!(w.in_flight(), 2);
        }
        assert_eq!(w.in_flight(), 0);
        assert!(!w.health_check_failed(2));
        assert!(w.is_healthy());
        assert!(w.health_check_failed(2));
        assert!(!w.is_healthy());
        w.set_healthy(true);
        assert!(!w.health_check_failed(2), "a success resets the failure count");
    }
}
