//! The HTTP server: shared state, routes, background tasks, and shutdown on SIGINT/SIGTERM.

pub mod admin;
pub mod client_conn;
pub mod dispatch;
pub mod generate;
pub mod messages;

use crate::api::objects::unix_now;
use crate::api::params::Endpoint;
use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::prompt::{BytesPromptBuilder, PromptBuilder};
use crate::routing::policy::Balance;
use crate::routing::Router as AffinityRouter;
use crate::workers::client::WorkerClient;
use crate::workers::{health, kubernetes, WorkerPool, WorkerSource};
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use client_conn::ClientConn;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

pub struct AppState {
    pub cfg: GatewayConfig,
    pub model_name: String,
    pub context_length: Option<usize>,
    pub api_keys: Vec<String>,
    pub pool: Arc<WorkerPool>,
    pub router: AffinityRouter,
    pub client: WorkerClient,
    pub metrics: Metrics,
    pub prompts: Arc<dyn PromptBuilder>,
}

impl AppState {
    pub fn new(cfg: GatewayConfig, prompts: Arc<dyn PromptBuilder>) -> Result<Self, String> {
        let pool =
            Arc::new(WorkerPool::new(cfg.breaker_failure_threshold, Duration::from_secs_f64(cfg.breaker_open_secs)));
        for url in &cfg.worker_urls {
            pool.add(url, WorkerSource::Static);
        }
        let router = AffinityRouter::new(
            Balance { abs_threshold: cfg.balance_abs_threshold, rel_threshold: cfg.balance_rel_threshold },
            cfg.max_inflight_per_worker,
            cfg.prefix_max_chunks_per_worker,
            Duration::from_secs_f64(cfg.session_ttl_secs),
            cfg.max_sessions,
        );
        let metrics = Metrics::new();
        let source = Arc::clone(&prompts);
        metrics.watch_image_cache(Box::new(move || source.image_cache_stats()));
        Ok(Self {
            model_name: cfg.model_name(),
            context_length: cfg.resolve_context_length(),
            api_keys: cfg.load_api_keys()?,
            client: WorkerClient::new(Duration::from_secs_f64(cfg.connect_timeout_secs)),
            metrics,
            pool,
            router,
            prompts,
            cfg,
        })
    }
}

/// The prompt builder the configuration asks for.
pub fn prompt_builder(cfg: &GatewayConfig) -> Result<Arc<dyn PromptBuilder>, String> {
    match cfg.tokenizer_mode.as_str() {
        "bytes" => Ok(Arc::new(BytesPromptBuilder)),
        _ => crate::prompt_model::ModelPromptBuilder::load(cfg).map(|b| Arc::new(b) as Arc<dyn PromptBuilder>),
    }
}

pub fn app(st: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/health", get(health_check))
        .route("/liveness", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/admin/workers", get(admin::list_workers).post(admin::add_worker).delete(admin::remove_worker))
        .fallback(not_found)
        .with_state(st)
}

/// The client's connection handle (absent for requests not served by our TCP listener).
fn split(request: Request) -> (ClientConn, HeaderMap, Body) {
    let (parts, body) = request.into_parts();
    let conn =
        parts.extensions.get::<ConnectInfo<ClientConn>>().map(|c| c.0.clone()).unwrap_or_else(ClientConn::unknown);
    (conn, parts.headers, body)
}

async fn chat_completions(State(st): State<Arc<AppState>>, request: Request) -> Response {
    let (conn, headers, body) = split(request);
    generate::handle(st, Endpoint::Chat, generate::Dialect::OpenAi, conn, headers, body).await
}

async fn completions(State(st): State<Arc<AppState>>, request: Request) -> Response {
    let (conn, headers, body) = split(request);
    generate::handle(st, Endpoint::Completion, generate::Dialect::OpenAi, conn, headers, body).await
}

fn model_card(st: &AppState) -> serde_json::Value {
    json!({"id": st.model_name, "object": "model", "created": unix_now(), "owned_by": "m3serve",
           "root": st.model_name, "max_model_len": st.context_length})
}

async fn list_models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let resp = match crate::auth::check_api_key(&st.api_keys, &headers) {
        Ok(()) => axum::Json(json!({"object": "list", "data": [model_card(&st)]})).into_response(),
        Err(e) => e.into_response(),
    };
    st.metrics.requests.with_label_values(&["models", resp.status().as_str()]).inc();
    resp
}

async fn get_model(State(st): State<Arc<AppState>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(e) = crate::auth::check_api_key(&st.api_keys, &headers) {
        return e.into_response();
    }
    if id != st.model_name {
        return ApiError::model_not_found(&id, &st.model_name).into_response();
    }
    axum::Json(model_card(&st)).into_response()
}

/// 200 while at least one worker can take traffic, else 503 (so a load balancer skips us).
async fn health_check(State(st): State<Arc<AppState>>) -> Response {
    let workers = st.pool.snapshot();
    let now = std::time::Instant::now();
    let healthy = workers.iter().filter(|w| w.is_routable(now)).count();
    let status = if healthy > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = json!({"status": if healthy > 0 { "ok" } else { "no healthy worker" },
                      "workers": workers.len(), "healthy_workers": healthy});
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = st.metrics.render(&st.pool.snapshot());
    let mut r = text.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::not_found(format!("Unknown route: {method} {}", uri.path())).into_response()
}

/// Bind, start background tasks, serve until SIGINT/SIGTERM (or `shutdown` resolves).
pub async fn run(
    cfg: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let prompts = prompt_builder(&cfg)?;
    let st = Arc::new(AppState::new(cfg, prompts)?);
    let addr = format!("{}:{}", st.cfg.host, st.cfg.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(address = %addr, model = %st.model_name, workers = st.pool.snapshot().len(),
        context_length = ?st.context_length, "m3serve gateway listening");

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(health::run_health_loop(
        st.client.clone(),
        Arc::clone(&st.pool),
        Duration::from_secs_f64(st.cfg.health_interval_secs),
        Duration::from_secs_f64(st.cfg.health_timeout_secs),
        st.cfg.health_failure_threshold,
    )));
    if let Some(k8s) = &st.cfg.kubernetes {
        let disc = kubernetes::PodDiscovery::from_config(k8s)?;
        let st2 = Arc::clone(&st);
        tasks.push(tokio::spawn(kubernetes::run_discovery_loop(
            disc,
            Arc::clone(&st.pool),
            Duration::from_secs_f64(k8s.poll_interval_secs),
            move |id| st2.router.forget_worker(id),
        )));
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let make_service = app(Arc::clone(&st)).into_make_service_with_connect_info::<ClientConn>();
    let server = axum::serve(listener, make_service).with_graceful_shutdown({
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    });
    let server = tokio::spawn(async move { server.await });
    tokio::select! {
        _ = shutdown => {}
        _ = termination_signal() => {}
    }
    let grace = Duration::from_secs_f64(st.cfg.shutdown_grace_secs.max(0.0));
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutting down: no new connections, draining open requests");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(grace, server).await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
