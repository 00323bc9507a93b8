//! POST /v1/messages (Anthropic's Messages API; the chat route behind a translation, see
//! `api::anthropic`) and POST /v1/messages/count_tokens.

use super::generate::{self, read_json, Dialect};
use super::{split, AppState};
use crate::api::anthropic;
use crate::api::params::Endpoint;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

pub async fn messages(State(st): State<Arc<AppState>>, request: Request) -> Response {
    let (conn, headers, body) = split(request);
    generate::handle(st, Endpoint::Chat, Dialect::Anthropic, conn, headers, body).await
}

/// `{"input_tokens": n}`: the prompt a /v1/messages request with the same fields would send the
/// worker (template, tokens, images), which is also the `input_tokens` its usage reports.
pub async fn count_tokens(State(st): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let (_, headers, body) = split(request);
    let resp = match count(&st, &headers, body).await {
        Ok(n) => axum::Json(json!({"input_tokens": n})).into_response(),
        Err(e) => anthropic::error_response(&e),
    };
    st.metrics.requests.with_label_values(&["count_tokens", resp.status().as_str()]).inc();
    st.metrics.request_seconds.with_label_values(&["count_tokens"]).observe(started.elapsed().as_secs_f64());
    resp
}

async fn count(st: &AppState, headers: &HeaderMap, body: axum::body::Body) -> Result<usize, ApiError> {
    crate::auth::check_anthropic_key(&st.api_keys, headers)?;
    let body = read_json(body, headers, st.cfg.max_body_bytes).await?;
    let chat = anthropic::count_tokens_request(&body)?;
    match chat.get("model") {
        Some(Value::String(m)) if *m == st.model_name => {}
        Some(Value::String(m)) => return Err(ApiError::model_not_found(m, &st.model_name)),
        _ => return Err(ApiError::invalid_param("model", "model: Field required (a string)")),
    }
    let t0 = Instant::now();
    let prompt = st.prompts.chat(&chat).await?;
    st.metrics.preprocess_seconds.with_label_values(&["count_tokens"]).observe(t0.elapsed().as_secs_f64());
    Ok(prompt.input_ids.len())
}
