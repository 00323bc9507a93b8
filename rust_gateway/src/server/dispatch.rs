//! Getting a request onto a worker: route, respect the breaker, hold an in-flight slot, retry on
//! another worker after a connection error before the first byte, and abort on the worker when
//! the client goes away.

use super::AppState;
use crate::error::ApiError;
use crate::routing::policy::Reason;
use crate::routing::{RouteError, RouteRequest};
use crate::workers::client::{GenerateBody, UpstreamError, WorkerClient};
use crate::workers::{InFlight, Worker};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request accepted by a worker: its response head, and the slot it holds there.
pub struct Accepted {
    pub worker: Arc<Worker>,
    pub responses: Vec<reqwest::Response>,
    pub slots: Vec<InFlight>,
    pub reason: Reason,
    /// Armed for every choice: dropping it before the generations finish aborts them on the worker.
    pub abort: AbortOnDrop,
}

/// Map a worker failure to what the client sees.
pub fn upstream_to_api(e: &UpstreamError) -> ApiError {
    match e {
        UpstreamError::Connect(m) => ApiError::unavailable(format!("No worker could be reached: {m}")),
        UpstreamError::Timeout => ApiError::timeout("The worker did not answer in time."),
        UpstreamError::Status { status, message } if (400..500).contains(status) => {
            let mut err = ApiError::invalid(format!("The worker refused the request: {message}"));
            if let Ok(s) = axum::http::StatusCode::from_u16(*status) {
                err.status = s;
            }
            err
        }
        UpstreamError::Status { status: 503, message } => {
            ApiError::unavailable(format!("Worker unavailable: {message}"))
        }
        other => ApiError::upstream(other.to_string()),
    }
}

/// Send `bodies` (one per choice; all go to the same worker so they share its prefix cache).
pub async fn dispatch(
    st: &AppState,
    bodies: &[GenerateBody],
    chunk_hashes: &[u64],
    session_key: Option<&str>,
    prompt_tokens: usize,
) -> Result<Accepted, ApiError> {
    let deadline = Duration::from_secs_f64(st.cfg.upstream_timeout_secs);
    let mut tried: HashSet<u64> = HashSet::new();
    let mut last_err: Option<ApiError> = None;
    for attempt in 0..=st.cfg.max_retries {
        let workers = st.pool.snapshot();
        let decision = match st.router.route(&workers, &RouteRequest { session_key, chunk_hashes, exclude: &tried }) {
            Ok(d) => d,
            Err(RouteError::AllAtCapacity) if last_err.is_none() => {
                return Err(ApiError::overloaded("All workers are at capacity; retry shortly."))
            }
            Err(_) => {
                return Err(last_err.unwrap_or_else(|| {
                    if workers.is_empty() {
                        ApiError::unavailable("No workers are registered with the gateway.")
                    } else {
                        ApiError::unavailable("No healthy worker is available.")
                    }
                }))
            }
        };
        let worker = decision.worker;
        tried.insert(worker.id);
        if !worker.try_acquire_breaker(Instant::now()) {
            continue;
        }
        let slots: Vec<InFlight> = bodies.iter().map(|_| InFlight::new(Arc::clone(&worker))).collect();
        let rids: Vec<String> = bodies.iter().filter_map(|b| b.rid.clone()).collect();
        // Armed before sending: if the client goes away while we wait, the worker is told to stop.
        let mut abort = AbortOnDrop::new(st.client.clone(), worker.url.clone(), rids, st.metrics.client_aborts.clone());
        // All choices at once: a non-streamed answer's head only comes when it is complete.
        let results =
            futures_util::future::join_all(bodies.iter().map(|b| st.client.generate(&worker.url, b, deadline))).await;
        let n_ok = results.iter().filter(|r| r.is_ok()).count();
        let mut responses = Vec::with_capacity(results.len());
        let mut first_err = None;
        for r in results {
            match r {
                Ok(resp) => responses.push(resp),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => {
                worker.record_success();
                st.metrics.routing_decisions.with_label_values(&[decision.reason.as_str()]).inc();
                st.metrics.routed_prompt_tokens.inc_by(prompt_tokens as u64);
                let matched = (decision.matched_chunks * st.cfg.prefix_chunk_tokens).min(prompt_tokens);
                st.metrics.affinity_matched_tokens.inc_by(matched as u64);
                return Ok(Accepted { worker, responses, slots, reason: decision.reason, abort });
            }
            Some(e) if n_ok > 0 => {
                // Some choices started, others failed: stop the started ones and give up.
                abort.abort_now();
                return Err(upstream_to_api(&e));
            }
            Some(e) => {
                let kind = match &e {
                    UpstreamError::Connect(_) => "connect",
                    UpstreamError::Timeout => "timeout",
                    UpstreamError::Status { .. } => "status",
                    UpstreamError::Protocol(_) => "protocol",
                };
                st.metrics.upstream_errors.with_label_values(&[kind]).inc();
                if e.is_worker_fault() {
                    worker.record_failure();
                } else {
                    worker.record_success(); // it answered: alive, the request was the problem
                }
                if matches!(e, UpstreamError::Connect(_)) {
                    // Take it out of routing now; the health loop brings it back.
                    worker.set_healthy(false);
                }
                tracing::warn!(worker = %worker.url, attempt, error = %e, "worker request failed");
                if matches!(e, UpstreamError::Timeout) {
                    // The worker may still run it: stop it there.
                    abort.abort_now();
                } else {
                    abort.disarm(); // refused or never arrived: nothing runs on the worker
                }
                let api = upstream_to_api(&e);
                if e.is_retryable() && attempt < st.cfg.max_retries {
                    st.metrics.upstream_retries.inc();
                    last_err = Some(api);
                    continue;
                }
                return Err(api);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| ApiError::unavailable("No healthy worker is available.")))
}

/// Aborts unfinished requests on the worker when dropped while armed (client disconnected, or
/// the handler future was cancelled).
pub struct AbortOnDrop {
    client: WorkerClient,
    url: String,
    pending: Vec<String>,
    metrics_hook: Option<prometheus::IntCounter>,
}

impl AbortOnDrop {
    pub fn new(client: WorkerClient, url: String, rids: Vec<String>, counter: prometheus::IntCounter) -> Self {
        Self { client, url, pending: rids, metrics_hook: Some(counter) }
    }

    /// This request finished on the worker; nothing to abort for it.
    pub fn finished(&mut self, rid: &str) {
        self.pending.retain(|r| r != rid);
    }

    pub fn disarm(&mut self) {
        self.pending.clear();
    }

    /// Abort everything still pending now, for a reason other than the client leaving.
    pub fn abort_now(&mut self) {
        self.metrics_hook = None;
        self.fire();
    }

    fn fire(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Some(c) = self.metrics_hook.take() {
            c.inc();
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        for rid in std::mem::take(&mut self.pending) {
            let (client, url) = (self.client.clone(), self.url.clone());
            handle.spawn(async move {
                let ok = client.abort(&url, &rid).await;
                tracing::info!(worker = %url, rid = %rid, aborted = ok, "aborted on worker");
            });
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.fire();
    }
}
