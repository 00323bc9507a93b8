//! Gateway configuration: one JSON document (written by `python/m3serve/gateway.py` from its flags),
//! with a default for everything but the workers.

use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub host: String,
    pub port: u16,
    /// Worker base URLs known at start (more can come from the admin API or Kubernetes).
    pub worker_urls: Vec<String>,
    /// Checkpoint directory: chat template, tokenizer, image processor config, context length.
    pub model_path: Option<String>,
    /// The model id clients send; defaults to the checkpoint directory's name.
    pub served_model_name: Option<String>,
    /// `model`: render + tokenize with the checkpoint (production). `bytes`: a test-only prompt
    /// encoder (UTF-8 bytes as token ids) used to exercise routing against fake workers without a
    /// checkpoint; it refuses images.
    pub tokenizer_mode: String,
    /// Context length; read from the checkpoint's config.json when absent.
    pub context_length: Option<usize>,
    /// `max_tokens` used when the client sends none (capped by what is left of the context).
    pub default_max_tokens: usize,
    /// Data-plane API keys (Bearer). Empty means no authentication.
    pub api_keys: Vec<String>,
    /// A file with one API key per line (blank lines and `#` comments ignored).
    pub api_key_file: Option<String>,
    /// Key for /admin/*; the admin API is disabled without one.
    pub admin_key: Option<String>,
    pub max_body_bytes: usize,
    /// Refuse private/loopback/link-local image URLs unless set (handed to the preprocessor).
    pub allow_private_image_urls: bool,
    /// Bytes the prepared-image cache may hold (0 disables it): a resent image costs a hash
    /// instead of a decode, resize, patchify and encode (see `preprocess::image_cache`).
    pub image_cache_bytes: usize,
    pub connect_timeout_secs: f64,
    /// Time allowed until the worker answers with headers (stream) or the whole body (non-stream).
    pub upstream_timeout_secs: f64,
    /// Extra attempts on other workers after a connection error before the first byte.
    pub max_retries: u32,
    pub health_interval_secs: f64,
    pub health_timeout_secs: f64,
    /// Consecutive failed checks before a worker is taken out of routing.
    pub health_failure_threshold: u32,
    pub breaker_failure_threshold: u32,
    pub breaker_open_secs: f64,
    /// Concurrent requests a worker takes from this gateway before it counts as full (429 when all are).
    pub max_inflight_per_worker: usize,
    /// Load imbalance tolerated to keep cache affinity: a preferred worker is used unless its
    /// in-flight count exceeds the least loaded worker's by more than `abs` AND by a factor `rel`.
    pub balance_abs_threshold: usize,
    pub balance_rel_threshold: f64,
    /// Tokens per prefix chunk; matches the worker's radix page size (M3: 128 = MSA block).
    pub prefix_chunk_tokens: usize,
    /// Bound on remembered chunks per worker (oldest evicted first).
    pub prefix_max_chunks_per_worker: usize,
    pub session_ttl_secs: f64,
    pub max_sessions: usize,
    pub kubernetes: Option<KubernetesConfig>,
    /// After SIGTERM/SIGINT: how long open requests (streams) may finish before the gateway exits.
    pub shutdown_grace_secs: f64,
    /// `json` (default) or `text`.
    pub log_format: String,
    /// tracing filter, e.g. `info` or `m3serve_gateway=debug`.
    pub log_level: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            worker_urls: Vec::new(),
            model_path: None,
            served_model_name: None,
            tokenizer_mode: "model".into(),
            context_length: None,
            default_max_tokens: 8192,
            api_keys: Vec::new(),
            api_key_file: None,
            admin_key: None,
            max_body_bytes: 64 * 1024 * 1024,
            allow_private_image_urls: false,
            image_cache_bytes: 256 * 1024 * 1024,
            connect_timeout_secs: 3.0,
            upstream_timeout_secs: 600.0,
            max_retries: 2,
            health_interval_secs: 5.0,
            health_timeout_secs: 3.0,
            health_failure_threshold: 2,
            breaker_failure_threshold: 5,
            breaker_open_secs: 10.0,
            max_inflight_per_worker: 512,
            balance_abs_threshold: 8,
            balance_rel_threshold: 1.5,
            prefix_chunk_tokens: 128,
            prefix_max_chunks_per_worker: 1 << 20,
            session_ttl_secs: 3600.0,
            max_sessions: 100_000,
            kubernetes: None,
            shutdown_grace_secs: 30.0,
            log_format: "json".into(),
            log_level: "info".into(),
        }
    }
}

/// Kubernetes pod discovery: poll the API server for pods matching a label selector.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// API server base URL; in-cluster default from KUBERNETES_SERVICE_HOST/PORT.
    pub api_server: Option<String>,
    /// Namespace; in-cluster default from the service account's namespace file.
    pub namespace: Option<String>,
    pub label_selector: String,
    /// Worker port on each pod (a pod annotation `m3serve.io/port` overrides it).
    pub port: u16,
    pub poll_interval_secs: f64,
    pub token_path: String,
    pub ca_path: String,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_server: None,
            namespace: None,
            label_selector: String::new(),
            port: 30000,
            poll_interval_secs: 5.0,
            token_path: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            ca_path: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
        }
    }
}

impl GatewayConfig {
    pub fn from_json(text: &str) -> Result<Self, String> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| format!("invalid gateway config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.tokenizer_mode != "model" && self.tokenizer_mode != "bytes" {
            return Err(format!("tokenizer_mode must be `model` or `bytes`, got `{}`", self.tokenizer_mode));
        }
        if self.tokenizer_mode == "model" && self.model_path.is_none() {
            return Err("model_path is required (the checkpoint directory with the chat template and tokenizer)".into());
        }
        if self.prefix_chunk_tokens == 0 {
            return Err("prefix_chunk_tokens must be positive".into());
        }
        if self.max_inflight_per_worker == 0 {
            return Err("max_inflight_per_worker must be positive".into());
        }
        for url in &self.worker_urls {
            validate_worker_url(url)?;
        }
        Ok(())
    }

    /// The id clients must send as `model`.
    pub fn model_name(&self) -> String {
        if let Some(name) = &self.served_model_name {
            return name.clone();
        }
        self.model_path
            .as_deref()
            .and_then(|p| Path::new(p.trim_end_matches('/')).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "minimax-m3".into())
    }

    /// All data-plane keys: the configured ones, the key file's, and `M3SERVE_API_KEY` from the env.
    pub fn load_api_keys(&self) -> Result<Vec<String>, String> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read api_key_file {path}: {e}"))?;
            keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from));
        }
        if let Ok(k) = std::env::var("M3SERVE_API_KEY") {
            if !k.trim().is_empty() {
                keys.push(k.trim().to_string());
            }
        }
        Ok(keys)
    }

    /// Context length: configured, else the checkpoint's `max_position_embeddings`
    /// (top level or under `text_config`).
    pub fn resolve_context_length(&self) -> Option<usize> {
        if self.context_length.is_some() {
            return self.context_length;
        }
        let dir = self.model_path.as_deref()?;
        let text = std::fs::read_to_string(Path::new(dir).join("config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let from = |o: &serde_json::Value| o.get("max_position_embeddings").and_then(|x| x.as_u64());
        from(&v).or_else(|| v.get("text_config").and_then(from)).map(|n| n as usize)
    }
}

/// A worker URL must be an absolute http(s) URL with a host.
pub fn validate_worker_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid worker url `{url}`: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!("invalid worker url `{url}`: expected http(s)://host:port"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c = GatewayConfig::from_json(r#"{"tokenizer_mode":"bytes","worker_urls":["http://127.0.0.1:1"]}"#).unwrap();
        assert_eq!(c.prefix_chunk_tokens, 128);
        assert_eq!(c.image_cache_bytes, 256 << 20);
        let c = GatewayConfig::from_json(r#"{"tokenizer_mode":"bytes","image_cache_bytes":0}"#).unwrap();
        assert_eq!(c.image_cache_bytes, 0);
        assert_eq!(c.model_name(), "minimax-m3");
        let err = GatewayConfig::from_json(r#"{"tokenizer_mode":"bytes","bogus":1}"#).unwrap_err();
        assert!(err.contains("bogus"), "{err}");
        let err = GatewayConfig::from_json(r#"{"worker_urls":[]}"#).unwrap_err();
        assert!(err.contains("model_path"), "{err}");
        let err = GatewayConfig::from_json(r#"{"tokenizer_mode":"bytes","worker_urls":["ftp://x"]}"#).unwrap_err();
        assert!(err.contains("ftp://x"), "{err}");
    }

    #[test]
    fn model_name_from_directory() {
        let c = GatewayConfig { model_path: Some("/models/MiniMax-M3/".into()), ..Default::default() };
        assert_eq!(c.model_name(), "MiniMax-M3");
    }
}
