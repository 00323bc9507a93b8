//! Prometheus metrics, served at GET /metrics. All names start with `m3gw_`.

use crate::preprocess::ImageCacheStats;
use crate::workers::Worker;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::Arc;

/// Reads the prepared-image cache's own counters at scrape time (its hot path stays two atomics).
pub type ImageCacheSource = Box<dyn Fn() -> ImageCacheStats + Send + Sync>;

/// `m3gw_image_cache_*`: hits, misses, coalesced waits and evictions (counters), bytes, entries and the bound (gauges).
struct ImageCacheCollector {
    source: ImageCacheSource,
    descs: Vec<Desc>,
}

impl ImageCacheCollector {
    const COUNTERS: [(&'static str, &'static str); 4] = [
        ("m3gw_image_cache_hits_total", "Images served from the prepared-image cache (no decode, resize or encode)"),
        ("m3gw_image_cache_misses_total", "Images looked up in the prepared-image cache and not found"),
        (
            "m3gw_image_cache_coalesced_total",
            "Images another request was already preparing: waited for its result instead of decoding again",
        ),
        ("m3gw_image_cache_evictions_total", "Images evicted from the prepared-image cache to stay within its bound"),
    ];
    const GAUGES: [(&'static str, &'static str); 3] = [
        ("m3gw_image_cache_bytes", "Bytes held by the prepared-image cache"),
        ("m3gw_image_cache_entries", "Images held by the prepared-image cache"),
        ("m3gw_image_cache_max_bytes", "Bound of the prepared-image cache in bytes (0: disabled)"),
    ];

    fn new(source: ImageCacheSource) -> Self {
        let mut descs = Vec::new();
        for (name, help) in Self::COUNTERS {
            descs.extend(IntCounter::new(name, help).expect("metric").desc().into_iter().cloned());
        }
        for (name, help) in Self::GAUGES {
            descs.extend(IntGauge::new(name, help).expect("metric").desc().into_iter().cloned());
        }
        Self { source, descs }
    }
}

impl Collector for ImageCacheCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = (self.source)();
        let mut out = Vec::new();
        for ((name, help), v) in Self::COUNTERS.into_iter().zip([s.hits, s.misses, s.coalesced, s.evictions]) {
            let c = IntCounter::new(name, help).expect("metric");
            c.inc_by(v);
            out.extend(c.collect());
        }
        for ((name, help), v) in Self::GAUGES.into_iter().zip([s.bytes, s.entries, s.max_bytes]) {
            let g = IntGauge::new(name, help).expect("metric");
            g.set(v as i64);
            out.extend(g.collect());
        }
        out
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub cached_tokens: IntCounter,
    pub ttft_seconds: Histogram,
    pub itl_seconds: Histogram,
    pub preprocess_seconds: HistogramVec,
    pub routing_decisions: IntCounterVec,
    /// Prompt tokens routed and, of those, tokens in chunks the chosen worker was believed to
    /// hold: their ratio is the cache-affinity hit rate.
    pub routed_prompt_tokens: IntCounter,
    pub affinity_matched_tokens: IntCounter,
    pub upstream_retries: IntCounter,
    pub upstream_errors: IntCounterVec,
    pub client_aborts: IntCounter,
    worker_in_flight: IntGaugeVec,
    worker_queue: IntGaugeVec,
    worker_running: IntGaugeVec,
    worker_healthy: IntGaugeVec,
    worker_breaker_open: IntGaugeVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect("metric registers once");
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let m = IntCounterVec::new(Opts::new(name, help), labels).expect("metric");
            reg(Box::new(m.clone()));
            m
        };
        let counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).expect("metric");
            reg(Box::new(m.clone()));
            m
        };
        let gauge_vec = |name: &str, help: &str| {
            let m = IntGaugeVec::new(Opts::new(name, help), &["worker"]).expect("metric");
            reg(Box::new(m.clone()));
            m
        };
        let hist = |name: &str, help: &str| {
            let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets())).expect("metric");
            reg(Box::new(m.clone()));
            m
        };
        let hist_vec = |name: &str, help: &str, labels: &[&str]| {
            let m =
                HistogramVec::new(HistogramOpts::new(name, help).buckets(latency_buckets()), labels).expect("metric");
            reg(Box::new(m.clone()));
            m
        };
        Self {
            requests: counter_vec("m3gw_requests_total", "Requests by route and HTTP status", &["route", "status"]),
            request_seconds: hist_vec("m3gw_request_duration_seconds", "Time from request to last byte", &["route"]),
            prompt_tokens: counter("m3gw_prompt_tokens_total", "Prompt tokens of completed requests"),
            completion_tokens: counter("m3gw_completion_tokens_total", "Generated tokens"),
            cached_tokens: counter(
                "m3gw_cached_prompt_tokens_total",
                "Prompt tokens the worker served from its prefix cache",
            ),
            ttft_seconds: hist(
                "m3gw_time_to_first_token_seconds",
                "Request arrival to first generated token (streamed requests)",
            ),
            itl_seconds: hist("m3gw_inter_token_latency_seconds", "Time between generated tokens (streaming)"),
            preprocess_seconds: hist_vec("m3gw_preprocess_seconds", "Template, tokenization and images", &["route"]),
            routing_decisions: counter_vec("m3gw_routing_decisions_total", "Worker choices by reason", &["reason"]),
            routed_prompt_tokens: counter("m3gw_routed_prompt_tokens_total", "Prompt tokens routed to workers"),
            affinity_matched_tokens: counter(
                "m3gw_affinity_matched_tokens_total",
                "Routed prompt tokens in prefix chunks the chosen worker was believed to hold",
            ),
            upstream_retries: counter("m3gw_upstream_retries_total", "Requests retried on another worker"),
            upstream_errors: counter_vec("m3gw_upstream_errors_total", "Worker errors by kind", &["kind"]),
            client_aborts: counter("m3gw_client_disconnects_total", "Requests aborted because the client went away"),
            worker_in_flight: gauge_vec("m3gw_worker_in_flight", "Requests this gateway has in flight per worker"),
            worker_queue: gauge_vec("m3gw_worker_queue", "Waiting requests the worker reports"),
            worker_running: gauge_vec("m3gw_worker_running", "Running requests the worker reports"),
            worker_healthy: gauge_vec("m3gw_worker_healthy", "1 when the worker passes health checks"),
            worker_breaker_open: gauge_vec("m3gw_worker_breaker_open", "1 when the worker's circuit breaker is open"),
            registry,
        }
    }

    /// Export the prepared-image cache's counters (read from `source` at every scrape).
    pub fn watch_image_cache(&self, source: ImageCacheSource) {
        self.registry.register(Box::new(ImageCacheCollector::new(source))).expect("image cache metrics register once");
    }

    /// Text exposition; per-worker gauges are refreshed from the pool at scrape time.
    pub fn render(&self, workers: &[Arc<Worker>]) -> String {
        for g in [
            &self.worker_in_flight,
            &self.worker_queue,
            &self.worker_running,
            &self.worker_healthy,
            &self.worker_breaker_open,
        ] {
            g.reset();
        }
        for w in workers {
            let info = w.info();
            let l = [info.url.as_str()];
            self.worker_in_flight.with_label_values(&l).set(info.in_flight as i64);
            self.worker_queue.with_label_values(&l).set(info.reported_waiting as i64);
            self.worker_running.with_label_values(&l).set(info.reported_running as i64);
            self.worker_healthy.with_label_values(&l).set(info.healthy as i64);
            self.worker_breaker_open.with_label_values(&l).set(info.breaker_open as i64);
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerSource;
    use std::time::Duration;

    #[test]
    fn render_includes_counters_and_worker_gauges() {
        let m = Metrics::new();
        m.requests.with_label_values(&["chat", "200"]).inc();
        m.ttft_seconds.observe(0.02);
        let w = Arc::new(Worker::new(1, "http://w:1".into(), WorkerSource::Static, 3, Duration::from_secs(1)));
        w.begin_request();
        let text = m.render(&[w]);
        assert!(text.contains(r#"m3gw_requests_total{route="chat",status="200"} 1"#), "{text}");
        assert!(text.contains(r#"m3gw_worker_in_flight{worker="http://w:1"} 1"#), "{text}");
        assert!(text.contains("m3gw_time_to_first_token_seconds_count 1"), "{text}");
    }

    #[test]
    fn image_cache_counters_are_read_at_scrape_time() {
        let m = Metrics::new();
        let stats = Arc::new(std::sync::Mutex::new(ImageCacheStats { max_bytes: 1 << 28, ..Default::default() }));
        let s = stats.clone();
        m.watch_image_cache(Box::new(move || *s.lock().unwrap()));
        let text = m.render(&[]);
        assert!(text.contains("m3gw_image_cache_hits_total 0"), "{text}");
        assert!(text.contains("m3gw_image_cache_max_bytes 268435456"), "{text}");
        *stats.lock().unwrap() = ImageCacheStats {
            hits: 3,
            misses: 2,
            coalesced: 5,
            evictions: 1,
            bytes: 4096,
            entries: 1,
            max_bytes: 1 << 28,
        };
        let text = m.render(&[]);
        for line in [
            "# TYPE m3gw_image_cache_hits_total counter",
            "m3gw_image_cache_hits_total 3",
            "m3gw_image_cache_misses_total 2",
            "# TYPE m3gw_image_cache_coalesced_total counter",
            "m3gw_image_cache_coalesced_total 5",
            "m3gw_image_cache_evictions_total 1",
            "# TYPE m3gw_image_cache_bytes gauge",
            "m3gw_image_cache_bytes 4096",
            "m3gw_image_cache_entries 1",
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }
}
