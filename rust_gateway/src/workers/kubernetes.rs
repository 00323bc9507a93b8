//! Kubernetes pod discovery without kube-rs: poll
//! `GET {api}/api/v1/namespaces/{ns}/pods?labelSelector=...` with the service-account token and
//! keep the worker set equal to the Ready pods (only workers this module added are removed).

use super::{WorkerPool, WorkerSource};
use crate::config::KubernetesConfig;
use serde_json::Value;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Pod annotation that overrides the worker port.
pub const PORT_ANNOTATION: &str = "m3serve.io/port";

pub struct PodDiscovery {
    api_server: String,
    namespace: String,
    selector: String,
    port: u16,
    token_path: String,
    http: reqwest::Client,
}

impl PodDiscovery {
    pub fn from_config(cfg: &KubernetesConfig) -> Result<Self, String> {
        let api_server = match &cfg.api_server {
            Some(s) => s.trim_end_matches('/').to_string(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                    "kubernetes discovery: no api_server given and KUBERNETES_SERVICE_HOST is unset".to_string()
                })?;
                let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                format!("https://{host}:{port}")
            }
        };
        let namespace = match &cfg.namespace {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .map(|s| s.trim().to_string())
                .map_err(|e| {
                    format!("kubernetes discovery: no namespace given and cannot read the service account's: {e}")
                })?,
        };
        if cfg.label_selector.trim().is_empty() {
            return Err("kubernetes discovery needs a label selector (e.g. app=m3serve-worker)".into());
        }
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if api_server.starts_with("https://") {
            if let Ok(pem) = std::fs::read(&cfg.ca_path) {
                let cert =
                    reqwest::Certificate::from_pem(&pem).map_err(|e| format!("bad CA at {}: {e}", cfg.ca_path))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            api_server,
            namespace,
            selector: cfg.label_selector.clone(),
            port: cfg.port,
            token_path: cfg.token_path.clone(),
            http: builder.build().map_err(|e| e.to_string())?,
        })
    }

    /// Worker URLs of the Ready pods right now.
    pub async fn list_worker_urls(&self) -> Result<Vec<String>, String> {
        let url = format!("{}/api/v1/namespaces/{}/pods", self.api_server, self.namespace);
        let mut req = self.http.get(&url).query(&[("labelSelector", self.selector.as_str())]);
        // Read the token every poll: projected service-account tokens rotate.
        if let Ok(token) = std::fs::read_to_string(&self.token_path) {
            req = req.bearer_auth(token.trim());
        }
        let resp = req.send().await.map_err(|e| format!("listing pods: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("listing pods: API server answered {}", resp.status()));
        }
        let body: Value =
            serde_json::from_slice(&resp.bytes().await.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        Ok(ready_pod_urls(&body, self.port))
    }
}

/// URLs `http://{podIP}:{port}` of pods that are Running, Ready and not being deleted.
pub fn ready_pod_urls(pod_list: &Value, default_port: u16) -> Vec<String> {
    let Some(items) = pod_list.get("items").and_then(Value::as_array) else { return Vec::new() };
    let mut urls: Vec<String> = items
        .iter()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none_or(Value::is_null))
        .filter(|p| p.pointer("/status/phase").and_then(Value::as_str) == Some("Running"))
        .filter(|p| {
            p.pointer("/status/conditions").and_then(Value::as_array).is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.get("type").and_then(Value::as_str) == Some("Ready")
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            })
        })
        .filter_map(|p| {
            let ip = p.pointer("/status/podIP").and_then(Value::as_str)?;
            let port = p
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(PORT_ANNOTATION))
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(default_port);
            let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
            Some(format!("http://{host}:{port}"))
        })
        .collect();
    urls.sort();
    urls.dedup();
    urls
}

/// Make the Kubernetes-sourced workers equal to `urls`. Returns (added, removed) URLs.
pub fn reconcile(pool: &WorkerPool, urls: &[String]) -> (Vec<String>, Vec<(u64, String)>) {
    let want: HashSet<&str> = urls.iter().map(String::as_str).collect();
    let mut added = Vec::new();
    for u in urls {
        if pool.add(u, WorkerSource::Kubernetes).1 {
            added.push(u.clone());
        }
    }
    let mut removed = Vec::new();
    for w in pool.snapshot() {
        if w.source == WorkerSource::Kubernetes && !want.contains(w.url.as_str()) {
            if let Some(w) = pool.remove(&w.url) {
                removed.push((w.id, w.url.clone()));
            }
        }
    }
    (added, removed)
}

/// Poll forever; `on_removed` lets routing forget a worker's affinity.
pub async fn run_discovery_loop(
    disc: PodDiscovery,
    pool: Arc<WorkerPool>,
    interval: Duration,
    on_removed: impl Fn(u64) + Send,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match disc.list_worker_urls().await {
            Ok(urls) => {
                let (added, removed) = reconcile(&pool, &urls);
                for u in &added {
                    tracing::info!(worker = %u, "kubernetes: worker added");
                }
                for (id, u) in removed {
                    tracing::info!(worker = %u, "kubernetes: worker removed");
                    on_removed(id);
                }
            }
            // Keep the current set when the API server is unreachable: losing discovery must not
            // drop healthy workers.
            Err(e) => tracing::warn!(error = %e, "kubernetes discovery poll failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ip: &str, phase: &str, ready: &str, extra: Value) -> Value {
        let mut p = json!({"metadata": {"name": ip}, "status": {"phase": phase, "podIP": ip,
            "conditions": [{"type": "Ready", "status": ready}]}});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                p["metadata"][k] = v;
            }
        }
        p
    }

    #[test]
    fn only_running_ready_live_pods_become_workers() {
        let list = json!({"items": [
            pod("10.0.0.1", "Running", "True", json!({})),
            pod("10.0.0.2", "Pending", "False", json!({})),
            pod("10.0.0.3", "Running", "False", json!({})),
            pod("10.0.0.4", "Running", "True", json!({"deletionTimestamp": "2026-01-01T00:00:00Z"})),
            pod("10.0.0.5", "Running", "True", json!({"annotations": {"m3serve.io/port": "31000"}})),
        ]});
        assert_eq!(ready_pod_urls(&list, 30000), vec!["http://10.0.0.1:30000", "http://10.0.0.5:31000"]);
    }

    #[test]
    fn reconcile_keeps_static_workers() {
        let pool = WorkerPool::new(3, Duration::from_secs(1));
        pool.add("http://static:1", WorkerSource::Static);
        let (added, removed) = reconcile(&pool, &["http://10.0.0.1:30000".into(), "http://10.0.0.2:30000".into()]);
        assert_eq!((added.len(), removed.len()), (2, 0));
        let (added, removed) = reconcile(&pool, &["http://10.0.0.2:30000".into()]);
        assert_eq!(added.len(), 0);
        assert_eq!(removed.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), vec!["http://10.0.0.1:30000"]);
        let urls: Vec<String> = pool.snapshot().iter().map(|w| w.url.clone()).collect();
        assert_eq!(urls, vec!["http://static:1", "http://10.0.0.2:30000"]);
    }
}
