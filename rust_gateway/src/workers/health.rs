//! Background health and load checks of every worker.
//!
//! `GET /health` decides routability (after `health_failure_threshold` consecutive failures a
//! worker leaves routing; one success brings it back). A check that *times out* while the worker is
//! serving requests of ours counts as busy, not dead: SGLang answers /health from the same event loop
//! that a long prefill (or a kernel compile) can hold for seconds, and evicting the worker then would
//! turn one slow step into 503s for everyone. A truly hung worker still leaves routing: its requests
//! hit the upstream timeout, which opens its circuit breaker. `GET /v1/loads?include=core` gives the
//! worker's own running/waiting counts, exported as metrics (traffic from other clients included).

use super::client::WorkerClient;
use super::Worker;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// One check of one worker. Returns whether it answered healthy.
pub async fn check_worker(client: &WorkerClient, worker: &Worker, timeout: Duration, failure_threshold: u32) -> bool {
    let outcome = client.http().get(format!("{}/health", worker.url)).timeout(timeout).send().await;
    let ok = matches!(&outcome, Ok(r) if r.status().is_success());
    let busy = matches!(&outcome, Err(e) if e.is_timeout()) && worker.in_flight() > 0;
    if busy {
        tracing::debug!(worker = %worker.url, in_flight = worker.in_flight(), "health check timed out while busy");
        return true;
    }
    if ok {
        let was_unhealthy = !worker.is_healthy();
        worker.set_healthy(true);
        if was_unhealthy {
            tracing::info!(worker = %worker.url, "worker healthy again");
        }
        if let Some((running, waiting)) = fetch_load(client, &worker.url, timeout).await {
            worker.set_reported_load(running, waiting);
        }
    } else if worker.health_check_failed(failure_threshold) {
        tracing::warn!(worker = %worker.url, "worker failed its health checks; out of routing");
    }
    ok
}

/// Sum of running and waiting requests over the worker's DP ranks, if it serves /v1/loads.
async fn fetch_load(client: &WorkerClient, base: &str, timeout: Duration) -> Option<(usize, usize)> {
    let resp = client.http().get(format!("{base}/v1/loads?include=core")).timeout(timeout).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&resp.bytes().await.ok()?).ok()?;
    let loads = v.get("loads")?.as_array()?;
    let sum = |k: &str| loads.iter().filter_map(|l| l.get(k).and_then(Value::as_u64)).sum::<u64>() as usize;
    Some((sum("num_running_reqs"), sum("num_waiting_reqs")))
}

/// Check all workers every `interval` until the process ends.
pub async fn run_health_loop(
    client: WorkerClient,
    pool: Arc<super::WorkerPool>,
    interval: Duration,
    timeout: Duration,
    failure_threshold: u32,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let checks = pool.snapshot().into_iter().map(|w| {
            let client = client.clone();
            async move {
                check_worker(&client, &w, timeout, failure_threshold).await;
            }
        });
        futures_util::future::join_all(checks).await;
    }
}
