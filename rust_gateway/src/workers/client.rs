//! HTTP client for SGLang's native API: POST /generate (token ids in, text out), POST
//! /abort_request, GET /health, GET /v1/loads.
//!
//! SGLang streams `data: {json}\n\n` events ending with `data: [DONE]`. Depending on the worker's
//! `--incremental-streaming-output`, each event carries either the whole text so far (default) or
//! only the new part; [`StreamAccumulator`] turns both into deltas.

use bytes::Bytes;
use serde_json::{json, Value};
use std::time::Duration;

/// A `/generate` body, ready to send: the serialized fields, then optionally one array field whose
/// items are already JSON text held elsewhere (the image hand-off strings, ~7 MB each, shared with
/// the image cache). Those items are sent as their own body chunks, neither re-escaped nor copied,
/// so building a body costs the small fields' serialization whatever the images weigh, and a
/// retry or another choice reuses the chunks. The bytes on the wire are the JSON `serde_json`
/// writes for the same object with that field last.
#[derive(Debug, Clone)]
pub struct GenerateBody {
    /// The body's `rid` (for aborts).
    pub rid: Option<String>,
    parts: Vec<Bytes>,
    len: usize,
}

impl GenerateBody {
    /// `body` serialized as is.
    pub fn new(body: &Value) -> Result<Self, serde_json::Error> {
        Self::with_raw_array(body, "", Vec::new())
    }

    /// `body` plus `key: [items...]` as its last field (none when `items` is empty). Each item must
    /// be one JSON value's text (checked in debug builds); `key` must not be in `body` already.
    pub fn with_raw_array(body: &Value, key: &str, items: Vec<Bytes>) -> Result<Self, serde_json::Error> {
        let rid = body.get("rid").and_then(Value::as_str).map(String::from);
        let mut head = serde_json::to_vec(body)?;
        if items.is_empty() {
            let len = head.len();
            return Ok(Self { rid, parts: vec![Bytes::from(head)], len });
        }
        assert!(body.is_object() && body.get(key).is_none(), "raw field {key:?} needs an object without it");
        debug_assert!(items.iter().all(|i| serde_json::from_slice::<serde::de::IgnoredAny>(i).is_ok()));
        head.pop(); // the object's closing brace
        if head.len() > 1 {
            head.push(b',');
        }
        serde_json::to_writer(&mut head, key)?;
        head.extend_from_slice(b":[");
        let mut parts = Vec::with_capacity(2 * items.len() + 1);
        parts.push(Bytes::from(head));
        for (k, item) in items.into_iter().enumerate() {
            if k > 0 {
                parts.push(Bytes::from_static(b","));
            }
            parts.push(item);
        }
        parts.push(Bytes::from_static(b"]}"));
        let len = parts.iter().map(Bytes::len).sum();
        Ok(Self { rid, parts, len })
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole body in one buffer (copies; for tests and logs).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out
    }

    /// A request body over the shared chunks (a fixed Content-Length is set by the caller).
    fn http_body(&self) -> reqwest::Body {
        if let [one] = self.parts.as_slice() {
            return reqwest::Body::from(one.clone());
        }
        // Reference-counted clones: the stream owns its chunks (a retry builds another).
        let parts: Vec<Bytes> = self.parts.clone();
        reqwest::Body::wrap_stream(futures_util::stream::iter(parts.into_iter().map(Ok::<Bytes, std::io::Error>)))
    }
}

#[derive(Debug)]
pub enum UpstreamError {
    /// Could not connect / the connection broke before any response: safe to retry elsewhere.
    Connect(String),
    /// No answer within the deadline.
    Timeout,
    /// The worker answered with an error status.
    Status { status: u16, message: String },
    /// Anything else (bad body, broken stream after the first byte).
    Protocol(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(m) => write!(f, "connection to worker failed: {m}"),
            UpstreamError::Timeout => write!(f, "worker did not answer in time"),
            UpstreamError::Status { status, message } => write!(f, "worker answered {status}: {message}"),
            UpstreamError::Protocol(m) => write!(f, "bad answer from worker: {m}"),
        }
    }
}

impl UpstreamError {
    /// Errors before the first byte that another worker could serve.
    pub fn is_retryable(&self) -> bool {
        matches!(self, UpstreamError::Connect(_)) || matches!(self, UpstreamError::Status { status: 503, .. })
    }

    /// Errors that count against the worker's circuit breaker (client errors do not).
    pub fn is_worker_fault(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status >= 500,
            _ => true,
        }
    }

    pub fn from_reqwest(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            UpstreamError::Timeout
        } else if e.is_connect() || e.is_request() {
            UpstreamError::Connect(e.to_string())
        } else {
            UpstreamError::Protocol(e.to_string())
        }
    }
}

#[derive(Clone)]
pub struct WorkerClient {
    http: reqwest::Client,
}

impl WorkerClient {
    pub fn new(connect_timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .expect("reqwest client");
        Self { http }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Send a /generate request and wait for the response head (`deadline` bounds that wait).
    pub async fn generate(
        &self,
        base: &str,
        body: &GenerateBody,
        deadline: Duration,
    ) -> Result<reqwest::Response, UpstreamError> {
        // An explicit length: a body of several chunks would otherwise go out chunked.
        let send = self
            .http
            .post(format!("{base}/generate"))
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(body.http_body())
            .send();
        let resp = match tokio::time::timeout(deadline, send).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(Err(e)) => return Err(UpstreamError::from_reqwest(e)),
            Ok(Ok(r)) => r,
        };
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = tokio::time::timeout(Duration::from_secs(5), resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(UpstreamError::Status { status, message: worker_error_message(&text) });
        }
        Ok(resp)
    }

    /// Ask the worker to stop generating `rid` (client went away). Best effort.
    pub async fn abort(&self, base: &str, rid: &str) -> bool {
        let req = self
            .http
            .post(format!("{base}/abort_request"))
            .json_body(&json!({ "rid": rid }))
            .timeout(Duration::from_secs(5));
        matches!(req.send().await, Ok(r) if r.status().is_success())
    }
}

/// Small helper so we need no reqwest `json` feature.
trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("content-type", "application/json").body(serde_json::to_vec(v).unwrap_or_default())
    }
}

/// The message inside a worker's error body (`{"error": {"message"}}`, `{"error": "..."}`,
/// `{"message": ...}` or FastAPI's `{"detail": ...}`), else the raw text.
pub fn worker_error_message(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return text.chars().take(500).collect();
    };
    let pick = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => other.get("message").and_then(Value::as_str).map(String::from).or_else(|| Some(other.to_string())),
        }
    };
    v.get("error")
        .and_then(pick)
        .or_else(|| v.get("message").and_then(pick))
        .or_else(|| v.get("detail").and_then(pick))
        .unwrap_or_else(|| text.chars().take(500).collect())
}

/// Incremental `text/event-stream` decoder: feed bytes, get complete `data:` payloads.
#[derive(Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
}

impl SseDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some((event, sep)) = find_event_end(&self.buf) {
            let raw: Vec<u8> = self.buf.drain(..event + sep).collect();
            let text = String::from_utf8_lossy(&raw[..event]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// Position of the first blank line ("\n\n" or "\r\n\r\n") and its length.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// One output token's log-probability, as OpenAI reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub top: Vec<(String, f64)>,
}

/// What changed since the previous event of one generation.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GenerateDelta {
    pub text: String,
    pub new_tokens: usize,
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last event: "stop", "length", or "abort: message".
    pub finish: Option<Finish>,
    /// The stop string that ended the generation (SGLang's `finish_reason.matched` when it is
    /// text; a stop token id or EOS leaves it empty).
    pub matched_stop: Option<String>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub reasoning_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Stop,
    Length,
    Abort { message: String, status: Option<u16> },
}

/// Turns SGLang's events (cumulative or incremental) into deltas.
#[derive(Default)]
pub struct StreamAccumulator {
    text_len: usize,
    tokens_seen: usize,
    logprobs_seen: usize,
}

impl StreamAccumulator {
    pub fn push(&mut self, event: &Value) -> Result<GenerateDelta, String> {
        if let Some(err) = event.get("error") {
            let message = match err {
                Value::String(s) => s.clone(),
                other => other.get("message").and_then(Value::as_str).unwrap_or("worker error").to_string(),
            };
            let status = err.get("code").and_then(Value::as_u64).map(|c| c as u16);
            return Ok(GenerateDelta { finish: Some(Finish::Abort { message, status }), ..Default::default() });
        }
        let meta = event.get("meta_info").ok_or_else(|| format!("event without meta_info: {event}"))?;
        let count = |k: &str| meta.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
        let completion_tokens = count("completion_tokens");
        let ids_len = event.get("output_ids").and_then(Value::as_array).map(Vec::len);
        // Cumulative events repeat every output id so far; incremental ones only the new ones.
        // The first event reads the same either way.
        // After the first event an incremental one has fewer ids than the completion count.
        let cumulative = ids_len.is_none_or(|n| n == completion_tokens);
        let text = event.get("text").and_then(Value::as_str).unwrap_or("");
        let delta_text = if cumulative && self.tokens_seen > 0 {
            // Cumulative text: keep what is new. SGLang may revise an incomplete UTF-8 tail, so
            // slice by the length already sent when it is a char boundary.
            if text.len() >= self.text_len && text.is_char_boundary(self.text_len) {
                text[self.text_len..].to_string()
            } else {
                String::new()
            }
        } else {
            text.to_string()
        };
        self.text_len = if cumulative { text.len() } else { self.text_len + text.len() };
        let new_tokens = completion_tokens.saturating_sub(self.tokens_seen);
        self.tokens_seen = completion_tokens.max(self.tokens_seen);

        let mut logprobs = Vec::new();
        if let Some(lp) = meta.get("output_token_logprobs").and_then(Value::as_array) {
            let tops = meta.get("output_top_logprobs").and_then(Value::as_array);
            let start = if cumulative { self.logprobs_seen.min(lp.len()) } else { 0 };
            for (i, entry) in lp.iter().enumerate().skip(start) {
                let top = tops
                    .and_then(|t| t.get(i))
                    .and_then(Value::as_array)
                    .map(|row| row.iter().filter_map(parse_logprob_entry).collect())
                    .unwrap_or_default();
                if let Some((token, logprob)) = parse_logprob_entry(entry) {
                    logprobs.push(TokenLogprob { token, logprob, top });
                }
            }
            self.logprobs_seen = if cumulative { lp.len() } else { self.logprobs_seen + lp.len() };
        }

        let finish_reason = meta.get("finish_reason").filter(|f| !f.is_null());
        let finish = finish_reason.map(parse_finish);
        let matched_stop = finish_reason
            .filter(|_| finish == Some(Finish::Stop))
            .and_then(|f| f.get("matched"))
            .and_then(Value::as_str)
            .map(String::from);
        Ok(GenerateDelta {
            text: delta_text,
            new_tokens,
            logprobs,
            finish,
            matched_stop,
            prompt_tokens: count("prompt_tokens"),
            completion_tokens,
            cached_tokens: count("cached_tokens"),
            reasoning_tokens: count("reasoning_tokens"),
        })
    }
}

/// SGLang logprob entries are `[logprob, token_id, text]`.
fn parse_logprob_entry(v: &Value) -> Option<(String, f64)> {
    let a = v.as_array()?;
    let lp = a.first()?.as_f64().unwrap_or(f64::NEG_INFINITY);
    let text = match a.get(2) {
        Some(Value::String(s)) => s.clone(),
        _ => a.get(1).map(|id| format!("<{id}>")).unwrap_or_default(),
    };
    Some((text, lp))
}

fn parse_finish(v: &Value) -> Finish {
    match v.get("type").and_then(Value::as_str) {
        Some("length") => Finish::Length,
        Some("abort") => Finish::Abort {
            message: v.get("message").and_then(Value::as_str).unwrap_or("aborted by worker").to_string(),
            status: v.get("status_code").and_then(Value::as_u64).map(|c| c as u16),
        },
        _ => Finish::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_body_splices_raw_items_last() {
        let body = json!({"rid": "a", "input_ids": [1, 2], "sampling_params": {"stop": ["\"\n"]}});
        let items = vec![Bytes::from_static(b"\"x\""), Bytes::from_static(b"\"y z\""), Bytes::from_static(b"[1]")];
        let b = GenerateBody::with_raw_array(&body, "image_data", items).unwrap();
        let mut want = body.clone();
        want["image_data"] = json!(["x", "y z", [1]]);
        assert_eq!(b.to_vec(), serde_json::to_vec(&want).unwrap());
        assert_eq!((b.rid.as_deref(), b.len()), (Some("a"), b.to_vec().len()));
        // No items: no field, one chunk; an empty object gets no stray comma.
        let plain = GenerateBody::with_raw_array(&body, "image_data", Vec::new()).unwrap();
        assert_eq!(plain.to_vec(), serde_json::to_vec(&body).unwrap());
        let only = GenerateBody::with_raw_array(&json!({}), "k", vec![Bytes::from_static(b"1")]).unwrap();
        assert_eq!(only.to_vec(), b"{\"k\":[1]}");
        assert_eq!(only.rid, None);
    }

    /// The chunks reach the worker as one body with a Content-Length (not chunked), byte for byte.
    #[tokio::test]
    async fn generate_sends_the_chunks_with_a_length() {
        use axum::http::HeaderMap;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(HeaderMap, Bytes)>();
        let app = axum::Router::new()
            .route(
                "/generate",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send((headers, body));
                        "{}"
                    }
                }),
            )
            .layer(axum::extract::DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let big = Bytes::from(format!("\"{}\"", "A".repeat(3 << 20)));
        let body = json!({"rid": "r", "input_ids": [5]});
        let client = WorkerClient::new(Duration::from_secs(5));
        for items in [vec![big.clone(), Bytes::from_static(b"\"b\"")], Vec::new()] {
            let g = GenerateBody::with_raw_array(&body, "image_data", items).unwrap();
            let resp = client.generate(&format!("http://{addr}"), &g, Duration::from_secs(30)).await.unwrap();
            assert!(resp.status().is_success());
            let (headers, got) = rx.recv().await.unwrap();
            assert_eq!(got.as_ref(), g.to_vec().as_slice());
            assert_eq!(headers.get("content-length").unwrap().to_str().unwrap(), g.len().to_string());
            assert!(headers.get("transfer-encoding").is_none());
        }
    }

    #[test]
    fn sse_decoder_handles_split_events() {
        let mut d = SseDecoder::default();
        assert!(d.push(b"data: {\"a\"").is_empty());
        assert_eq!(d.push(b":1}\n\ndata: [DONE]\n"), vec!["{\"a\":1}"]);
        assert_eq!(d.push(b"\n"), vec!["[DONE]"]);
        assert_eq!(d.push(b"data: x\r\n\r\n"), vec!["x"]);
    }

    fn ev(text: &str, ids: usize, completion: usize, finish: Value) -> Value {
        json!({"text": text, "output_ids": vec![1; ids],
               "meta_info": {"prompt_tokens": 7, "completion_tokens": completion, "cached_tokens": 3, "finish_reason": finish}})
    }

    #[test]
    fn cumulative_events_become_deltas() {
        let mut acc = StreamAccumulator::default();
        let d1 = acc.push(&ev("Hel", 1, 1, Value::Null)).unwrap();
        let d2 = acc.push(&ev("Hello", 2, 2, Value::Null)).unwrap();
        let d3 = acc.push(&ev("Hello!", 3, 3, json!({"type": "stop"}))).unwrap();
        assert_eq!((d1.text.as_str(), d2.text.as_str(), d3.text.as_str()), ("Hel", "lo", "!"));
        assert_eq!(d2.new_tokens, 1);
        assert_eq!(d3.finish, Some(Finish::Stop));
        assert_eq!((d3.prompt_tokens, d3.cached_tokens), (7, 3));
    }

    #[test]
    fn incremental_events_pass_through() {
        let mut acc = StreamAccumulator::default();
        let d1 = acc.push(&ev("Hel", 1, 1, Value::Null)).unwrap();
        let d2 = acc.push(&ev("lo", 1, 2, Value::Null)).unwrap();
        let d3 = acc.push(&ev("!!", 2, 4, json!({"type": "length", "length": 4}))).unwrap();
        assert_eq!((d1.text.as_str(), d2.text.as_str(), d3.text.as_str()), ("Hel", "lo", "!!"));
        assert_eq!(d3.new_tokens, 2);
        assert_eq!(d3.finish, Some(Finish::Length));
    }

    #[test]
    fn matched_stop_string_is_kept_but_not_a_token_id() {
        let mut acc = StreamAccumulator::default();
        let d = acc.push(&ev("Hi", 1, 1, json!({"type": "stop", "matched": "END"}))).unwrap();
        assert_eq!((d.finish, d.matched_stop.as_deref()), (Some(Finish::Stop), Some("END")));
        let d = StreamAccumulator::default().push(&ev("Hi", 1, 1, json!({"type": "stop", "matched": 200020}))).unwrap();
        assert_eq!(d.matched_stop, None);
        let d = StreamAccumulator::default().push(&ev("Hi", 1, 1, json!({"type": "length", "length": 1}))).unwrap();
        assert_eq!(d.matched_stop, None);
    }

    #[test]
    fn logprobs_and_errors() {
        let mut acc = StreamAccumulator::default();
        let e = json!({"text": "a", "output_ids": [5], "meta_info": {"completion_tokens": 1,
            "output_token_logprobs": [[-0.5, 5, "a"]], "output_top_logprobs": [[[-0.5, 5, "a"], [-1.5, 6, "b"]]]}});
        let d = acc.push(&e).unwrap();
        assert_eq!(d.logprobs[0].token, "a");
        assert_eq!(d.logprobs[0].top[1], ("b".to_string(), -1.5));
        let err = acc.push(&json!({"error": {"message": "boom", "code": 400}})).unwrap();
        assert_eq!(err.finish, Some(Finish::Abort { message: "boom".into(), status: Some(400) }));
    }

    #[test]
    fn error_messages_from_worker_bodies() {
        assert_eq!(worker_error_message(r#"{"error": {"message": "too long"}}"#), "too long");
        assert_eq!(worker_error_message(r#"{"error": "bad field"}"#), "bad field");
        assert_eq!(worker_error_message(r#"{"object":"error","message":"m"}"#), "m");
        assert_eq!(worker_error_message("plain"), "plain");
    }
}
