//! Admin API (needs the admin key): list, add and remove workers at run time.
//!
//! GET /admin/workers; POST /admin/workers {"url": ...}; DELETE /admin/workers {"url": ...} or
//! `?url=...`.

use super::generate::read_body;
use super::AppState;
use crate::error::ApiError;
use crate::workers::{health, WorkerSource};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn guard(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    crate::auth::check_admin_key(st.cfg.admin_key.as_deref(), headers)
}

pub async fn list_workers(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = guard(&st, &headers) {
        return e.into_response();
    }
    let workers: Vec<_> = st.pool.snapshot().iter().map(|w| w.info()).collect();
    Json(json!({"workers": workers})).into_response()
}

async fn url_from(headers: &HeaderMap, body: Body, query: &HashMap<String, String>) -> Result<String, ApiError> {
    if let Some(u) = query.get("url") {
        return Ok(u.clone());
    }
    let bytes = read_body(body, headers, 64 * 1024).await?;
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("expected {{\"url\": ...}}: {e}")))?;
    v.get("url")
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| ApiError::invalid_param("url", "expected {\"url\": \"http://host:port\"}"))
}

pub async fn add_worker(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let result = async {
        guard(&st, &headers)?;
        let url = url_from(&headers, body, &q).await?;
        crate::config::validate_worker_url(&url).map_err(|m| ApiError::invalid_param("url", m))?;
        let (worker, created) = st.pool.add(&url, WorkerSource::Admin);
        if created {
            tracing::info!(worker = %worker.url, "admin: worker added");
            // First health check right away, so a dead URL leaves routing quickly.
            let (client, w) = (st.client.clone(), Arc::clone(&worker));
            let (timeout, threshold) =
                (Duration::from_secs_f64(st.cfg.health_timeout_secs), st.cfg.health_failure_threshold);
            tokio::spawn(async move { health::check_worker(&client, &w, timeout, threshold).await });
        }
        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
        Ok::<_, ApiError>((status, Json(json!({"worker": worker.info(), "created": created}))).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn remove_worker(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Body,
) -> Response {
    let result = async {
        guard(&st, &headers)?;
        let url = url_from(&headers, body, &q).await?;
        let w = st
            .pool
            .remove(&url)
            .ok_or_else(|| ApiError::not_found(format!("No worker with url {url}")).with_param("url"))?;
        st.router.forget_worker(w.id);
        tracing::info!(worker = %w.url, in_flight = w.in_flight(), "admin: worker removed");
        Ok::<_, ApiError>(Json(json!({"removed": w.info()})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
