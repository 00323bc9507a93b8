//! POST /v1/chat/completions, /v1/completions and /v1/messages: validate, preprocess, route, then
//! either stream SSE chunks or collect one response. /v1/messages (Anthropic) is the chat route with
//! its request translated on the way in and its response on the way out (`api::anthropic`).

use super::client_conn::ClientConn;
use super::dispatch::{dispatch, Accepted};
use super::AppState;
use crate::api::anthropic::{self, MessageStream};
use crate::api::objects::{chat_logprobs, completion_logprobs, finish_reason, new_id, unix_now, Usage};
use crate::api::params::{self, Endpoint, GenParams};
use crate::api::tool_grammar::{tool_call_grammar, ReasoningStart};
use crate::error::ApiError;
use crate::parsers::{OutputParser, ParsedDelta};
use crate::preprocess::PreparedImage;
use crate::prompt::Prompt;
use crate::routing::prefix::chunk_hashes;
use crate::workers::client::{Finish, GenerateBody, GenerateDelta, SseDecoder, StreamAccumulator};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Most `n` a request may ask for.
const MAX_N: usize = 16;

/// The API a request came in through: its wire format at both edges (the pipeline between is one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    /// Anthropic's Messages API; always with `Endpoint::Chat`.
    Anthropic,
}

/// The `route` label of the request metrics.
fn route_label(endpoint: Endpoint, dialect: Dialect) -> &'static str {
    match (dialect, endpoint) {
        (Dialect::Anthropic, _) => "messages",
        (Dialect::OpenAi, Endpoint::Chat) => "chat_completions",
        (Dialect::OpenAi, Endpoint::Completion) => "completions",
    }
}

/// An error as the request's API shapes it.
fn error_response(dialect: Dialect, e: ApiError) -> Response {
    match dialect {
        Dialect::OpenAi => e.into_response(),
        Dialect::Anthropic => anthropic::error_response(&e),
    }
}

/// Everything fixed once the request is accepted.
struct Job {
    endpoint: Endpoint,
    dialect: Dialect,
    params: GenParams,
    prompt: Prompt,
    id: String,
    created: u64,
    rids: Vec<String>,
    started: Instant,
}

pub async fn handle(
    st: Arc<AppState>,
    endpoint: Endpoint,
    dialect: Dialect,
    conn: ClientConn,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let route = route_label(endpoint, dialect);
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(String::from)
        .unwrap_or_else(|| new_id("req"));
    let mut resp = match run(&st, endpoint, dialect, &conn, &headers, body, started, &request_id).await {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(request_id = %request_id, route, status = e.status.as_u16(), error = %e.message, "request refused");
            error_response(dialect, e)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        if dialect == Dialect::Anthropic {
            // Where Anthropic's SDKs look for it (`_request_id`, error messages).
            resp.headers_mut().insert("request-id", v.clone());
        }
        resp.headers_mut().insert("x-request-id", v);
    }
    st.metrics.requests.with_label_values(&[route, resp.status().as_str()]).inc();
    if resp.status() != StatusCode::OK || !is_event_stream(&resp) {
        st.metrics.request_seconds.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    }
    resp
}

fn is_event_stream(resp: &Response) -> bool {
    resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Read the body under the size limit.
/// The request body (within `limit` bytes) parsed as JSON.
pub async fn read_json(body: Body, headers: &HeaderMap, limit: usize) -> Result<Value, ApiError> {
    let bytes = read_body(body, headers, limit).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("The request body is not valid JSON: {e}")))
}

pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::body_too_large(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let text = e.to_string();
        if text.contains("length limit") || text.contains("too large") {
            ApiError::body_too_large(limit)
        } else {
            ApiError::invalid(format!("Could not read the request body: {text}"))
        }
    })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    st: &Arc<AppState>,
    endpoint: Endpoint,
    dialect: Dialect,
    conn: &ClientConn,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
    request_id: &str,
) -> Result<Response, ApiError> {
    match dialect {
        Dialect::OpenAi => crate::auth::check_api_key(&st.api_keys, headers)?,
        Dialect::Anthropic => crate::auth::check_anthropic_key(&st.api_keys, headers)?,
    }
    let body = read_json(body, headers, st.cfg.max_body_bytes).await?;
    let body = match dialect {
        Dialect::OpenAi => body,
        Dialect::Anthropic => anthropic::chat_request(&body)?,
    };
    let params = params::parse(&body, endpoint, MAX_N)?;
    if params.model != st.model_name {
        return Err(ApiError::model_not_found(&params.model, &st.model_name));
    }
    if endpoint == Endpoint::Chat {
        match body.get("messages") {
            Some(Value::Array(m)) if !m.is_empty() => {}
            Some(Value::Array(_)) => return Err(ApiError::invalid_param("messages", "`messages` must not be empty")),
            _ => return Err(ApiError::invalid_param("messages", "`messages` must be an array of messages")),
        }
    }

    let t0 = Instant::now();
    let prompt = match endpoint {
        Endpoint::Chat => st.prompts.chat(&body).await?,
        Endpoint::Completion => st.prompts.completion(&body).await?,
    };
    let route = route_label(endpoint, dialect);
    st.metrics.preprocess_seconds.with_label_values(&[route]).observe(t0.elapsed().as_secs_f64());
    if prompt.input_ids.is_empty() {
        return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
    }
    let max_new_tokens = max_new_tokens(st, &params, prompt.input_ids.len())?;
    let mut params = params;
    force_tool_calls(&mut params, &prompt);

    let session_key = headers
        .get("x-session-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(String::from)
        .or_else(|| params.user.clone());
    let hashes = chunk_hashes(&prompt.input_ids, st.cfg.prefix_chunk_tokens, &prompt.image_salts);

    let rid_base = uuid::Uuid::new_v4().simple().to_string();
    let rids: Vec<String> = (0..params.n).map(|i| format!("{rid_base}-{i}")).collect();
    let bodies: Vec<GenerateBody> = rids
        .iter()
        .enumerate()
        .map(|(i, rid)| worker_request(&params, &prompt, max_new_tokens, rid, i))
        .collect::<Result<_, _>>()?;
    let id = match (dialect, endpoint) {
        (Dialect::Anthropic, _) => format!("msg_{}", uuid::Uuid::new_v4().simple()),
        (Dialect::OpenAi, Endpoint::Chat) => new_id("chatcmpl"),
        (Dialect::OpenAi, Endpoint::Completion) => new_id("cmpl"),
    };
    let job = Job { endpoint, dialect, id, created: unix_now(), params, prompt, rids, started };
    let work = async {
        let accepted = dispatch(st, &bodies, &hashes, session_key.as_deref(), job.prompt.input_ids.len()).await?;
        tracing::debug!(request_id, worker = %accepted.worker.url, reason = accepted.reason.as_str(), "routed");
        if job.params.stream {
            Ok(stream_response(Arc::clone(st), job, accepted, request_id.to_string()))
        } else {
            collect_response(st, job, accepted, request_id).await
        }
    };
    // A client that hangs up before its response starts cancels the request: dropping `work` drops
    // the armed abort guard, which tells the worker. (Streams watch their channel instead.)
    tokio::select! {
        r = work => r,
        _ = conn.closed(Duration::from_millis(50)) => {
            tracing::info!(request_id, "client disconnected before the response");
            Err(ApiError::invalid("client disconnected").with_code("client_closed_request"))
        }
    }
}

/// Tokens to generate: what the client asked for, else the default, within the context.
fn max_new_tokens(st: &AppState, p: &GenParams, prompt_len: usize) -> Result<usize, ApiError> {
    let Some(ctx) = st.context_length else {
        return Ok(p.max_tokens.unwrap_or(st.cfg.default_max_tokens));
    };
    if prompt_len >= ctx {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "This model's maximum context length is {ctx} tokens. However, your prompt has {prompt_len} tokens."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = ctx - prompt_len;
    match p.max_tokens {
        Some(m) if m > room => Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {m} for the completion).",
                prompt_len + m
            ),
        )
        .with_code("context_length_exceeded")),
        Some(m) => Ok(m),
        None => Ok(st.cfg.default_max_tokens.min(room)),
    }
}

/// `tool_choice` "required" / a named function: constrain the worker to tool calls with an EBNF
/// grammar (what may precede the calls depends on how the rendered prompt left `<mm:think>`).
fn force_tool_calls(params: &mut GenParams, prompt: &Prompt) {
    let (Some(choice), Some(tools)) = (&params.forced_tool_choice, &params.tools) else { return };
    let reasoning = if prompt.reasoning_prefilled {
        ReasoningStart::Open
    } else if prompt.reasoning_closed {
        ReasoningStart::Closed
    } else {
        ReasoningStart::Optional
    };
    let grammar = tool_call_grammar(tools, choice, params.parallel_tool_calls, reasoning);
    params.sampling.insert("ebnf".into(), json!(grammar));
}

/// The SGLang /generate body for choice `index`.
fn worker_body(p: &GenParams, prompt: &Prompt, max_new_tokens: usize, rid: &str, index: usize) -> Value {
    let mut sampling: Map<String, Value> = p.sampling.clone();
    sampling.insert("max_new_tokens".into(), json!(max_new_tokens));
    if let (Some(seed), true) = (p.seed, index > 0) {
        // n > 1 with a seed: distinct but reproducible choices.
        sampling.insert("sampling_seed".into(), json!(seed.wrapping_add(index as i64)));
    }
    let mut body = Map::new();
    body.insert("rid".into(), json!(rid));
    body.insert("input_ids".into(), json!(prompt.input_ids));
    body.insert("sampling_params".into(), Value::Object(sampling));
    body.insert("stream".into(), json!(p.stream));
    if p.logprobs {
        body.insert("return_logprob".into(), json!(true));
        body.insert("top_logprobs_num".into(), json!(p.top_logprobs));
        body.insert("return_text_in_logprobs".into(), json!(true));
        // Only the generated tokens' logprobs: -1 starts after the prompt.
        body.insert("logprob_start_len".into(), json!(-1));
    }
    Value::Object(body)
}

/// The bytes of the /generate body for choice `index`: [`worker_body`] plus `image_data`, whose
/// hand-off strings are sent from the image cache's memory as they are (no escaping pass, no
/// copy), so this costs the same with ten 7 MB images as without and can stay on the runtime.
fn worker_request(
    p: &GenParams,
    prompt: &Prompt,
    max_new_tokens: usize,
    rid: &str,
    index: usize,
) -> Result<GenerateBody, ApiError> {
    let images = prompt.images.iter().map(PreparedImage::data_url_json_bytes).collect();
    GenerateBody::with_raw_array(&worker_body(p, prompt, max_new_tokens, rid, index), "image_data", images)
        .map_err(|e| ApiError::internal(format!("cannot serialize the worker request: {e}")))
}

fn new_parser(job: &Job) -> Option<OutputParser> {
    (job.endpoint == Endpoint::Chat).then(|| {
        let tools = if job.params.parse_tool_calls { job.params.tools.as_ref() } else { None };
        OutputParser::new(tools, job.params.separate_reasoning)
            .with_prefilled_reasoning(job.prompt.reasoning_prefilled)
            .with_hidden_tokens(job.prompt.hidden_output_tokens.clone())
            .with_tool_calls(job.params.parse_tool_calls)
    })
}

/// The client-facing error for a generation the worker aborted.
fn abort_error(message: &str, status: Option<u16>) -> ApiError {
    match status {
        Some(s) if (400..500).contains(&s) => {
            let mut e = ApiError::invalid(message.to_string());
            e.status = StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST);
            e
        }
        _ => ApiError::upstream(format!("The worker aborted the request: {message}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Non-streaming

async fn collect_response(
    st: &Arc<AppState>,
    job: Job,
    accepted: Accepted,
    request_id: &str,
) -> Result<Response, ApiError> {
    let Accepted { worker, responses, slots, reason, mut abort } = accepted;
    let deadline = Duration::from_secs_f64(st.cfg.upstream_timeout_secs);
    let mut choices = Vec::new();
    let mut matched_stop = None;
    let mut usage = Usage { prompt_tokens: job.prompt.input_ids.len(), ..Default::default() };
    for (index, resp) in responses.into_iter().enumerate() {
        let bytes = match tokio::time::timeout(deadline, resp.bytes()).await {
            Err(_) => return Err(ApiError::timeout("The worker did not finish in time.")),
            Ok(Err(e)) => return Err(ApiError::upstream(format!("Reading the worker's answer failed: {e}"))),
            Ok(Ok(b)) => b,
        };
        abort.finished(&job.rids[index]);
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::upstream(format!("The worker's answer is not JSON: {e}")))?;
        // SGLang answers a single request with an object (a list only for batches).
        let v = match v {
            Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
            other => other,
        };
        let d: GenerateDelta = StreamAccumulator::default().push(&v).map_err(ApiError::upstream)?;
        if let Some(Finish::Abort { message, status }) = &d.finish {
            return Err(abort_error(message, *status));
        }
        usage.completion_tokens += d.completion_tokens;
        usage.cached_tokens = usage.cached_tokens.max(d.cached_tokens);
        usage.reasoning_tokens += d.reasoning_tokens;
        if index == 0 {
            matched_stop = d.matched_stop.clone();
        }
        choices.push(build_choice(&job, index, &d));
    }
    abort.disarm();
    drop(slots);
    record_usage(st, &usage);
    let object = if job.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
    let mut body = json!({
        "id": job.id, "object": object, "created": job.created, "model": job.params.model,
        "system_fingerprint": null, "choices": choices, "usage": usage.to_json(),
    });
    if job.dialect == Dialect::Anthropic {
        let sequence = anthropic::stop_sequence(matched_stop.as_deref(), job.params.sampling.get("stop"));
        body = anthropic::message_from_chat(&body, sequence.as_deref());
    }
    tracing::info!(request_id, worker = %worker.url, reason = reason.as_str(), prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens, cached_tokens = usage.cached_tokens,
        duration_ms = job.started.elapsed().as_millis() as u64, "request done");
    Ok(json_response(&body))
}

fn build_choice(job: &Job, index: usize, d: &GenerateDelta) -> Value {
    match new_parser(job) {
        Some(parser) => {
            let msg = parser.parse_complete(&d.text);
            let called = !msg.tool_calls.is_empty();
            let mut message = json!({"role": "assistant", "content": msg.content});
            if called && msg.content.is_empty() {
                message["content"] = Value::Null;
            }
            if let Some(r) = msg.reasoning_content {
                message["reasoning_content"] = json!(r);
            }
            if called {
                message["tool_calls"] = Value::Array(
                    msg.tool_calls
                        .iter()
                        .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                        .collect(),
                );
            }
            let logprobs =
                if job.params.logprobs { chat_logprobs(&d.logprobs, job.params.top_logprobs) } else { Value::Null };
            json!({"index": index, "message": message, "logprobs": logprobs,
                   "finish_reason": finish_reason(d.finish.as_ref(), called)})
        }
        None => {
            let logprobs = if job.params.logprobs {
                completion_logprobs(&d.logprobs, job.params.top_logprobs, 0)
            } else {
                Value::Null
            };
            json!({"index": index, "text": d.text, "logprobs": logprobs, "finish_reason": finish_reason(d.finish.as_ref(), false)})
        }
    }
}

fn record_usage(st: &AppState, u: &Usage) {
    st.metrics.prompt_tokens.inc_by(u.prompt_tokens as u64);
    st.metrics.completion_tokens.inc_by(u.completion_tokens as u64);
    st.metrics.cached_tokens.inc_by(u.cached_tokens as u64);
}

fn json_response(v: &Value) -> Response {
    let mut r = (StatusCode::OK, serde_json::to_vec(v).unwrap_or_default()).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

// ---------------------------------------------------------------------------------------------
// Streaming

/// Per-choice state of a streamed generation.
struct ChoiceStream {
    decoder: SseDecoder,
    acc: StreamAccumulator,
    parser: Option<OutputParser>,
    finished: bool,
    called_tools: bool,
    text_offset: usize,
    completion_tokens: usize,
    reasoning_tokens: usize,
    cached_tokens: usize,
}

fn stream_response(st: Arc<AppState>, job: Job, accepted: Accepted, request_id: String) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move { drive_stream(st, job, accepted, tx, request_id).await });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, std::convert::Infallible>(b), rx))
    }));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// How a stream's chunks go on the wire: as they are (OpenAI), or as Anthropic's events.
enum StreamOut {
    OpenAi,
    Anthropic(Box<MessageStream>),
}

impl StreamOut {
    fn new(job: &Job) -> Self {
        match job.dialect {
            Dialect::OpenAi => Self::OpenAi,
            Dialect::Anthropic => {
                Self::Anthropic(Box::new(MessageStream::new(&job.id, &job.params.model, job.prompt.input_ids.len())))
            }
        }
    }

    fn chunk(&mut self, c: &Value) -> Vec<Bytes> {
        match self {
            Self::OpenAi => vec![sse(c)],
            Self::Anthropic(m) => m.push(c).iter().map(anthropic::sse_event).collect(),
        }
    }

    /// The generation finished: note what the Anthropic stop reason needs before its last chunks.
    fn finishing(&mut self, job: &Job, d: &GenerateDelta) {
        if let Self::Anthropic(m) = self {
            m.set_stop_sequence(anthropic::stop_sequence(d.matched_stop.as_deref(), job.params.sampling.get("stop")));
        }
    }

    fn error(&self, e: &ApiError) -> Bytes {
        match self {
            Self::OpenAi => sse(&e.to_json()),
            Self::Anthropic(m) => anthropic::sse_event(&m.error(e)),
        }
    }

    /// The end-of-stream marker (Anthropic's streams end with `message_stop`, sent with the usage).
    fn done(&self) -> Option<Bytes> {
        matches!(self, Self::OpenAi).then(|| Bytes::from_static(b"data: [DONE]\n\n"))
    }
}

/// Send every piece; false when the client is gone.
async fn send_all(tx: &mpsc::Sender<Bytes>, pieces: Vec<Bytes>) -> bool {
    for b in pieces {
        if tx.send(b).await.is_err() {
            return false;
        }
    }
    true
}

fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

impl Job {
    fn chunk(&self, choices: Value) -> Value {
        let object = if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut c = json!({"id": self.id, "object": object, "created": self.created, "model": self.params.model,
                           "system_fingerprint": null, "choices": choices});
        if self.params.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn delta_chunk(&self, index: usize, delta: Value, logprobs: Value) -> Value {
        if self.endpoint == Endpoint::Chat {
            self.chunk(json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": null}]))
        } else {
            let text = delta.get("content").cloned().unwrap_or(json!(""));
            self.chunk(json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": null}]))
        }
    }
}

fn parsed_to_delta(d: ParsedDelta) -> (Value, bool) {
    match d {
        ParsedDelta::Content(t) => (json!({"content": t}), false),
        ParsedDelta::Reasoning(t) => (json!({"reasoning_content": t}), false),
        ParsedDelta::ToolCallStart { index, id, name } => (
            json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
            true,
        ),
        ParsedDelta::ToolCallArguments { index, arguments } => {
            (json!({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}), true)
        }
    }
}

async fn drive_stream(st: Arc<AppState>, job: Job, accepted: Accepted, tx: mpsc::Sender<Bytes>, request_id: String) {
    let Accepted { worker, responses, slots, reason, mut abort } = accepted;
    let idle = Duration::from_secs_f64(st.cfg.upstream_timeout_secs);
    let mut states: Vec<ChoiceStream> = (0..responses.len())
        .map(|_| ChoiceStream {
            decoder: SseDecoder::default(),
            acc: StreamAccumulator::default(),
            parser: new_parser(&job),
            finished: false,
            called_tools: false,
            text_offset: 0,
            completion_tokens: 0,
            reasoning_tokens: 0,
            cached_tokens: 0,
        })
        .collect();
    let mut merged = futures_util::stream::select_all(
        responses.into_iter().enumerate().map(|(i, r)| r.bytes_stream().map(move |item| (i, item)).boxed()),
    );
    let mut out = StreamOut::new(&job);

    // Opening chunk per choice, as OpenAI sends it.
    for i in 0..states.len() {
        let opening = if job.endpoint == Endpoint::Chat {
            job.delta_chunk(i, json!({"role": "assistant", "content": ""}), Value::Null)
        } else {
            continue;
        };
        if !send_all(&tx, out.chunk(&opening)).await {
            return; // client gone; `abort` fires on drop
        }
    }

    let mut first_token_at: Option<Instant> = None;
    let mut last_token_at: Option<Instant> = None;
    let mut failure: Option<ApiError> = None;
    while states.iter().any(|s| !s.finished) {
        let next = tokio::select! {
            _ = tx.closed() => return, // client disconnected: drop aborts the worker requests
            n = tokio::time::timeout(idle, merged.next()) => n,
        };
        let (i, item) = match next {
            Err(_) => {
                failure = Some(ApiError::timeout("The worker stopped sending tokens."));
                break;
            }
            Ok(None) => {
                if states.iter().any(|s| !s.finished) {
                    failure = Some(ApiError::upstream("The worker closed the stream before finishing."));
                }
                break;
            }
            Ok(Some(x)) => x,
        };
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                failure = Some(ApiError::upstream(format!("The worker's stream broke: {e}")));
                break;
            }
        };
        for payload in states[i].decoder.push(&bytes) {
            if payload.trim() == "[DONE]" || states[i].finished {
                continue;
            }
            let event: Value = match serde_json::from_str(&payload) {
                Ok(v) => v,
                Err(e) => {
                    failure = Some(ApiError::upstream(format!("Bad event from the worker: {e}")));
                    break;
                }
            };
            let d = match states[i].acc.push(&event) {
                Ok(d) => d,
                Err(e) => {
                    failure = Some(ApiError::upstream(e));
                    break;
                }
            };
            if d.new_tokens > 0 {
                let now = Instant::now();
                match last_token_at {
                    None => st.metrics.ttft_seconds.observe(job.started.elapsed().as_secs_f64()),
                    Some(prev) => {
                        let per = now.duration_since(prev).as_secs_f64() / d.new_tokens as f64;
                        for _ in 0..d.new_tokens.min(64) {
                            st.metrics.itl_seconds.observe(per);
                        }
                    }
                }
                first_token_at.get_or_insert(now);
                last_token_at = Some(now);
            }
            if let Some(Finish::Abort { message, status }) = &d.finish {
                failure = Some(abort_error(message, *status));
                states[i].finished = true;
                abort.finished(&job.rids[i]);
                break;
            }
            if d.finish.is_some() {
                out.finishing(&job, &d);
            }
            let chunks = step_chunks(&job, i, &mut states[i], &d);
            for c in chunks {
                if !send_all(&tx, out.chunk(&c)).await {
                    return;
                }
            }
            if d.finish.is_some() {
                states[i].finished = true;
                abort.finished(&job.rids[i]);
            }
        }
        if failure.is_some() {
            break;
        }
    }

    let usage = Usage {
        prompt_tokens: job.prompt.input_ids.len(),
        completion_tokens: states.iter().map(|s| s.completion_tokens).sum(),
        cached_tokens: states.iter().map(|s| s.cached_tokens).max().unwrap_or(0),
        reasoning_tokens: states.iter().map(|s| s.reasoning_tokens).sum(),
    };
    record_usage(&st, &usage);
    if let Some(err) = &failure {
        tracing::warn!(request_id = %request_id, worker = %worker.url, error = %err.message, "stream failed");
        let _ = tx.send(out.error(err)).await;
    } else {
        abort.disarm();
        if job.params.include_usage {
            let mut c = job.chunk(json!([]));
            c["usage"] = usage.to_json();
            send_all(&tx, out.chunk(&c)).await;
        }
    }
    if let Some(done) = out.done() {
        let _ = tx.send(done).await;
    }
    drop(slots);
    let route = route_label(job.endpoint, job.dialect);
    st.metrics.request_seconds.with_label_values(&[route]).observe(job.started.elapsed().as_secs_f64());
    tracing::info!(request_id = %request_id, worker = %worker.url, reason = reason.as_str(), stream = true,
        prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens,
        cached_tokens = usage.cached_tokens, failed = failure.is_some(),
        duration_ms = job.started.elapsed().as_millis() as u64, "request done");
}

/// The chunks one worker event produces for choice `i`.
fn step_chunks(job: &Job, i: usize, s: &mut ChoiceStream, d: &GenerateDelta) -> Vec<Value> {
    s.completion_tokens = d.completion_tokens.max(s.completion_tokens);
    s.reasoning_tokens = d.reasoning_tokens.max(s.reasoning_tokens);
    s.cached_tokens = d.cached_tokens.max(s.cached_tokens);
    let mut logprobs = if job.params.logprobs && !d.logprobs.is_empty() {
        match job.endpoint {
            Endpoint::Chat => chat_logprobs(&d.logprobs, job.params.top_logprobs),
            Endpoint::Completion => completion_logprobs(&d.logprobs, job.params.top_logprobs, s.text_offset),
        }
    } else {
        Value::Null
    };
    let mut out = Vec::new();
    let mut deltas: Vec<Value> = Vec::new();
    match s.parser.as_mut() {
        Some(p) => {
            let mut parsed = p.push(&d.text);
            if d.finish.is_some() {
                parsed.extend(p.finish());
            }
            for pd in parsed {
                let (delta, tool) = parsed_to_delta(pd);
                s.called_tools |= tool;
                deltas.push(delta);
            }
        }
        None => {
            if !d.text.is_empty() {
                deltas.push(json!({"content": d.text}));
            }
        }
    }
    s.text_offset += d.text.len();
    for delta in deltas {
        out.push(job.delta_chunk(i, delta, std::mem::take(&mut logprobs)));
    }
    if !logprobs.is_null() {
        // Tokens whose text the parser still holds back: report their logprobs anyway.
        let empty = if job.endpoint == Endpoint::Chat { json!({}) } else { json!({"content": ""}) };
        out.push(job.delta_chunk(i, empty, logprobs));
    }
    if d.finish.is_some() {
        let reason = finish_reason(d.finish.as_ref(), s.called_tools);
        let choice = if job.endpoint == Endpoint::Chat {
            json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": reason}])
        } else {
            json!([{"index": i, "text": "", "logprobs": null, "finish_reason": reason}])
        };
        out.push(job.chunk(choice));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::handoff::worker_image_data;
    use crate::preprocess::image_cache::{settings_fingerprint, ImageSource};
    use crate::preprocess::{ImageCache, ImageConfig, ImageProcessor, WireDtype};

    /// What the server sent before `GenerateBody`: the image hand-off copied into the body's
    /// `serde_json::Value` as its last field, then the whole body serialized.
    pub(super) fn old_body_bytes(p: &GenParams, prompt: &Prompt, max_new: usize, rid: &str, index: usize) -> Vec<u8> {
        let mut body = worker_body(p, prompt, max_new, rid, index);
        if let Some(images) = worker_image_data(&prompt.images) {
            body.as_object_mut().unwrap().insert("image_data".into(), images);
        }
        serde_json::to_vec(&body).unwrap()
    }

    fn png(seed: u32, w: u32, h: u32) -> Vec<u8> {
        let data: Vec<u8> =
            (0..w * h * 3).map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) >> 13) as u8).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_raw(w, h, data).unwrap().write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// Through the image cache: a miss (prepared and inserted) or a hit (the cached `Arc`).
    fn through_cache(c: &ImageCache, p: &ImageProcessor, bytes: &[u8], dtype: WireDtype) -> (Arc<PreparedImage>, bool) {
        let key = c.key(ImageSource::Bytes(bytes));
        if let Some(hit) = c.get(&key) {
            return (hit, true);
        }
        let image = Arc::new(PreparedImage::new(p.process_bytes(bytes).unwrap(), dtype, false));
        c.insert(key, image.clone());
        (image, false)
    }

    #[test]
    fn body_bytes_are_the_old_construction() {
        let cfg = ImageConfig::default();
        let processor = ImageProcessor::new(cfg.clone());
        for dtype in [WireDtype::BFloat16, WireDtype::Float32] {
            let c = ImageCache::new(64 << 20, settings_fingerprint(&cfg, dtype, false));
            let (a, b) = (png(1, 120, 90), png(2, 64, 200));
            let (miss_a, hit) = through_cache(&c, &processor, &a, dtype);
            assert!(!hit);
            let (miss_b, _) = through_cache(&c, &processor, &b, dtype);
            let (hit_a, hit) = through_cache(&c, &processor, &a, dtype);
            assert!(hit && Arc::ptr_eq(&hit_a, &miss_a));
            let with_images = vec![miss_a.clone(), miss_b, hit_a];
            for (images, request) in [
                (with_images.clone(), json!({"model": "m3", "temperature": 0.5, "top_p": 0.9, "stop": ["\"\n"]})),
                (with_images, json!({"model": "m3", "n": 2, "seed": 7, "logprobs": true, "top_logprobs": 2})),
                (vec![miss_a], json!({"model": "m3", "stream": true})),
                (Vec::new(), json!({"model": "m3", "n": 2, "seed": 3})),
            ] {
                let mut request = request;
                request["messages"] = json!([{"role": "user", "content": "hi"}]);
                let params = params::parse(&request, Endpoint::Chat, MAX_N).unwrap();
                let prompt = Prompt { input_ids: vec![1, 2, 3, 70000], images, ..Default::default() };
                for index in 0..params.n {
                    let rid = format!("r-{index}");
                    let old = old_body_bytes(&params, &prompt, 64, &rid, index);
                    let new = worker_request(&params, &prompt, 64, &rid, index).unwrap();
                    assert_eq!(new.rid.as_deref(), Some(rid.as_str()));
                    assert_eq!(new.len(), old.len());
                    let bytes = new.to_vec();
                    let (old_v, new_v): (Value, Value) =
                        (serde_json::from_slice(&old).unwrap(), serde_json::from_slice(&bytes).unwrap());
                    assert_eq!(new_v, old_v);
                    assert_eq!(new_v.get("image_data").is_some(), !prompt.images.is_empty());
                    // Not only the same value: the same bytes.
                    assert!(bytes == old, "bodies differ for {request}");
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::tests::old_body_bytes;
    use super::*;
    use crate::preprocess::images::{best_of_15_ms, ProcessedImage};
    use crate::preprocess::{PreparedImage, WireDtype};

    /// A 576-token image (grid 1x48x48) as the cache holds it (bf16 hand-off, ~7.2 MB).
    fn image(seed: u32) -> Arc<PreparedImage> {
        let n = 48 * 48 * 1176;
        let pixel_values =
            (0..n).map(|i| ((i as u32 ^ seed).wrapping_mul(2654435761) as f32 / u32::MAX as f32) * 4.0 - 2.0).collect();
        let p = ProcessedImage {
            pixel_values,
            grid_thw: [1, 48, 48],
            resized_hw: (672, 672),
            original_hw: (1080, 1920),
            merge_size: 2,
        };
        Arc::new(PreparedImage::new(p, WireDtype::BFloat16, false))
    }

    /// `cargo test --release --lib -- --ignored --nocapture server::generate::timing`: what the
    /// server does per request from cached images to the `/generate` body bytes (best of 15):
    /// before (hand-off copied into a `Value`, the body serialized) and now (`worker_request`).
    #[test]
    #[ignore]
    fn image_body_assembly() {
        let params =
            params::parse(&json!({"model": "m3", "messages": [], "temperature": 0.7}), Endpoint::Chat, MAX_N).unwrap();
        let all: Vec<Arc<PreparedImage>> = (0..10).map(image).collect();
        for k in [0usize, 1, 10] {
            let images = all[..k].to_vec();
            let ids: Vec<u32> = (0..k as u32 * 600 + 2000).collect();
            let prompt = Prompt { input_ids: ids, images, ..Default::default() };
            let t_old = best_of_15_ms(&mut || drop(old_body_bytes(&params, &prompt, 100, "rid-0", 0)));
            let t_new = best_of_15_ms(&mut || drop(worker_request(&params, &prompt, 100, "rid-0", 0).unwrap()));
            let body = worker_request(&params, &prompt, 100, "rid-0", 0).unwrap();
            let t_flat = best_of_15_ms(&mut || drop(std::hint::black_box(body.to_vec())));
            eprintln!(
                "{k} image(s), body {} B: before (Value + to_vec) {t_old:.3} ms, now (GenerateBody) {t_new:.3} ms; \
                 one memcpy of the body into a fresh buffer {t_flat:.3} ms",
                body.len()
            );
        }
    }
}
