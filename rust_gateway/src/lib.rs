//! m3serve's gateway: the one HTTP endpoint agent frameworks talk to.
//!
//! Built by maturin into the Python package as `m3serve._gateway`. Request path:
//! `server` (HTTP, auth, limits) -> `api` (OpenAI fields) -> `prompt` / `preprocess` (template,
//! tokens, images) -> `routing` (which worker) -> `workers` (SGLang /generate, health, breaker,
//! discovery) -> `parsers` (reasoning + tool calls) -> OpenAI JSON or SSE.
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod metrics;
pub mod parsers;
pub mod preprocess;
pub mod prompt;
pub mod prompt_model;
pub mod routing;
pub mod server;
pub mod workers;

/// Version of the gateway crate, so Python can check it loaded the extension it was built with.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Structured logs to stderr (JSON lines by default); only the first call installs the subscriber.
fn init_logging(cfg: &config::GatewayConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("M3SERVE_LOG").unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = if cfg.log_format == "text" { builder.try_init() } else { builder.json().flatten_event(true).try_init() };
}

/// Run the gateway until SIGINT/SIGTERM. `config_json` is a JSON object of
/// [`config::GatewayConfig`] fields. The GIL is released while serving.
#[pyfunction]
fn serve(py: Python<'_>, config_json: &str) -> PyResult<()> {
    let cfg = config::GatewayConfig::from_json(config_json).map_err(PyValueError::new_err)?;
    init_logging(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("m3gw")
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    py.allow_threads(|| rt.block_on(server::run(cfg, std::future::pending()))).map_err(PyRuntimeError::new_err)
}

#[pymodule]
fn _gateway(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    preprocess::register(m)?;
    Ok(())
}
