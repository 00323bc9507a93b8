//! Anthropic's Messages API (POST /v1/messages) as a translation at the edges of the chat route.
//!
//! In: a Messages request becomes the chat-completions body `/v1/chat/completions` takes, so the
//! template, tokenization, images, routing, retries, output parsing and metrics are the chat
//! route's own, not a copy that could drift. Out: the chat completion (or its chunk stream, through
//! [`MessageStream`]) becomes a Message (or Anthropic's SSE events), and an [`ApiError`] becomes
//! Anthropic's error shape with the HTTP status the chat route would answer.

use crate::error::ApiError;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Map, Value};

/// A Messages request -> the equivalent chat-completions request (`max_tokens` required).
pub fn chat_request(body: &Value) -> Result<Value, ApiError> {
    translate(body, true)
}

/// A count_tokens request -> the chat-completions request whose prompt it measures.
pub fn count_tokens_request(body: &Value) -> Result<Value, ApiError> {
    translate(body, false)
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_param(param, message)
}

fn translate(body: &Value, generate: bool) -> Result<Value, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::invalid("The request body must be a JSON object."))?;
    let mut out = Map::new();
    // Type and value are checked by the chat route's parameter parsing, which names the field.
    if let Some(model) = obj.get("model") {
        out.insert("model".into(), model.clone());
    }
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err(bad("messages", "messages: at least one message is required")),
        _ => return Err(bad("messages", "messages: Field required (an array of {role, content})")),
    };
    let mut chat = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system_message(obj.get("system"))? {
        chat.push(system);
    }
    for (i, m) in messages.iter().enumerate() {
        message(i, m, &mut chat)?;
    }
    out.insert("messages".into(), Value::Array(chat));
    if let Some(tools) = tools(obj.get("tools"))? {
        out.insert("tools".into(), tools);
    }
    tool_choice(obj.get("tool_choice"), &mut out)?;
    match obj.get("thinking") {
        None | Some(Value::Null) => {}
        // The chat route maps `thinking.type` enabled/disabled onto M3's thinking_mode; the budget
        // has no counterpart (max_tokens bounds reasoning and answer together).
        Some(t) if t.get("type").is_some_and(Value::is_string) => {
            out.insert("thinking".into(), t.clone());
        }
        Some(_) => return Err(bad("thinking", "thinking: must be an object with a `type`")),
    }
    if !generate {
        return Ok(Value::Object(out));
    }

    match obj.get("max_tokens") {
        None | Some(Value::Null) => return Err(bad("max_tokens", "max_tokens: Field required")),
        Some(v) => {
            out.insert("max_tokens".into(), v.clone());
        }
    }
    // top_k is a sampling parameter of the chat route too (SGLang's), with the same meaning.
    for key in ["temperature", "top_p", "top_k", "stream"] {
        if let Some(v) = obj.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    if obj.get("stream") == Some(&Value::Bool(true)) {
        // message_delta carries output_tokens: have the chat stream end with its usage chunk.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    // Structured outputs: the chat route's json_schema constrained decoding.
    match obj.get("output_config").and_then(|c| c.get("format")) {
        None | Some(Value::Null) => {}
        Some(f) if f.get("type").and_then(Value::as_str) == Some("json_schema") && f["schema"].is_object() => {
            let schema = f["schema"].clone();
            out.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}),
            );
        }
        Some(_) => {
            return Err(bad(
                "output_config.format",
                "output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}",
            ))
        }
    }
    match obj.get("stop_sequences") {
        None | Some(Value::Null) => {}
        Some(Value::Array(s)) if s.iter().all(Value::is_string) => {
            if !s.is_empty() {
                out.insert("stop".into(), Value::Array(s.clone()));
            }
        }
        Some(_) => return Err(bad("stop_sequences", "stop_sequences: must be an array of strings")),
    }
    // Not a parameter, but a stable per-conversation id (Claude Code sends its session here): the
    // chat route's `user`, a routing session key that keeps a conversation on the worker caching it.
    if let Some(user) = obj.get("metadata").and_then(|m| m.get("user_id")).and_then(Value::as_str) {
        out.insert("user".into(), json!(user));
    }
    Ok(Value::Object(out))
}

/// Text parts -> one string (what the template would concatenate anyway, and the one content form
/// every chat template reads); parts with images stay a list.
fn collapse(parts: Vec<Value>) -> Value {
    if parts.iter().all(|p| p["type"] == "text") {
        Value::String(parts.iter().filter_map(|p| p["text"].as_str()).collect())
    } else {
        Value::Array(parts)
    }
}

fn block_type<'a>(param: &str, block: &'a Value) -> Result<&'a str, ApiError> {
    block.get("type").and_then(Value::as_str).ok_or_else(|| bad(param, format!("{param}: a block needs a `type`")))
}

fn string_field<'a>(param: &str, block: &'a Value, key: &str) -> Result<&'a str, ApiError> {
    block.get(key).and_then(Value::as_str).ok_or_else(|| bad(param, format!("{param}.{key}: must be a string")))
}

fn unsupported(param: &str, kind: &str, allowed: &str) -> ApiError {
    bad(param, format!("{param}: content block type {kind:?} is not supported here (supported: {allowed})"))
}

fn system_message(system: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let text = match system {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => {
            let mut text = String::new();
            for (j, b) in blocks.iter().enumerate() {
                let param = format!("system.{j}");
                match block_type(&param, b)? {
                    "text" => text.push_str(string_field(&param, b, "text")?),
                    other => return Err(unsupported(&param, other, "text")),
                }
            }
            text
        }
        Some(_) => return Err(bad("system", "system: must be a string or an array of text blocks")),
    };
    // Empty means no system prompt, so the template's default applies as when it is absent.
    Ok((!text.is_empty()).then(|| json!({"role": "system", "content": text})))
}

fn message(i: usize, m: &Value, out: &mut Vec<Value>) -> Result<(), ApiError> {
    let param = format!("messages.{i}");
    let role = m.get("role").and_then(Value::as_str);
    match (role, m.get("content")) {
        (Some(role @ ("user" | "assistant")), Some(Value::String(s))) => {
            out.push(json!({"role": role, "content": s}));
        }
        (Some("user"), Some(Value::Array(blocks))) => user_blocks(&param, blocks, out)?,
        (Some("assistant"), Some(Value::Array(blocks))) => out.push(assistant_blocks(&param, blocks)?),
        (Some("user" | "assistant"), _) => {
            return Err(bad(&param, format!("{param}.content: must be a string or an array of content blocks")))
        }
        (Some(other), _) => {
            return Err(bad(
                &param,
                format!(
                    "{param}.role: must be \"user\" or \"assistant\", got {other:?} (a system prompt goes in `system`)"
                ),
            ))
        }
        (None, _) => return Err(bad(&param, format!("{param}.role: Field required"))),
    }
    Ok(())
}

/// A user turn: text and images stay one user message; each `tool_result` becomes a `tool`
/// message, in the order the blocks come (Anthropic puts results first, answering the previous
/// assistant turn's calls, as the chat format wants them).
fn user_blocks(param: &str, blocks: &[Value], out: &mut Vec<Value>) -> Result<(), ApiError> {
    let mut parts = Vec::new();
    let flush = |parts: &mut Vec<Value>, out: &mut Vec<Value>| {
        if !parts.is_empty() {
            out.push(json!({"role": "user", "content": collapse(std::mem::take(parts))}));
        }
    };
    for (j, b) in blocks.iter().enumerate() {
        let p = format!("{param}.content.{j}");
        match block_type(&p, b)? {
            "text" => parts.push(json!({"type": "text", "text": string_field(&p, b, "text")?})),
            "image" => parts.push(image_part(&p, b)?),
            "tool_result" => {
                flush(&mut parts, out);
                out.push(tool_result(&p, b)?);
            }
            other => return Err(unsupported(&p, other, "text, image, tool_result")),
        }
    }
    flush(&mut parts, out);
    Ok(())
}

fn assistant_blocks(param: &str, blocks: &[Value]) -> Result<Value, ApiError> {
    let (mut text, mut reasoning, mut calls) = (String::new(), String::new(), Vec::new());
    for (j, b) in blocks.iter().enumerate() {
        let p = format!("{param}.content.{j}");
        match block_type(&p, b)? {
            "text" => text.push_str(string_field(&p, b, "text")?),
            // The template renders an assistant turn's `reasoning_content` as its <mm:think> section.
            "thinking" => reasoning.push_str(string_field(&p, b, "thinking")?),
            // Encrypted by Anthropic for its own models: nothing M3 could read.
            "redacted_thinking" => {}
            "tool_use" => calls.push(tool_use(&p, b)?),
            other => return Err(unsupported(&p, other, "text, thinking, redacted_thinking, tool_use")),
        }
    }
    let mut msg = json!({"role": "assistant", "content": text});
    if text.is_empty() && !calls.is_empty() {
        msg["content"] = Value::Null;
    }
    if !reasoning.is_empty() {
        msg["reasoning_content"] = json!(reasoning);
    }
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    Ok(msg)
}

fn image_part(param: &str, b: &Value) -> Result<Value, ApiError> {
    let source = b.get("source").filter(|s| s.is_object()).ok_or_else(|| {
        bad(param, format!("{param}.source: Field required ({{type: base64, media_type, data}} or {{type: url, url}})"))
    })?;
    let sp = format!("{param}.source");
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media_type = string_field(&sp, source, "media_type")?;
            let data = string_field(&sp, source, "data")?;
            format!("data:{media_type};base64,{data}")
        }
        // Fetched by the chat route's image fetcher, under its address (SSRF) rules.
        Some("url") => string_field(&sp, source, "url")?.to_string(),
        other => return Err(bad(&sp, format!("{sp}.type: must be \"base64\" or \"url\", got {other:?}"))),
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn tool_use(param: &str, b: &Value) -> Result<Value, ApiError> {
    let id = string_field(param, b, "id")?;
    let name = string_field(param, b, "name")?;
    let input = match b.get("input") {
        Some(v @ Value::Object(_)) => v,
        _ => return Err(bad(param, format!("{param}.input: must be an object"))),
    };
    // The chat format carries arguments as JSON text (the chat route parses them back for the template).
    Ok(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input.to_string()}}))
}

fn tool_result(param: &str, b: &Value) -> Result<Value, ApiError> {
    let id = string_field(param, b, "tool_use_id")?;
    let mut parts = Vec::new();
    match b.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => parts.push(json!({"type": "text", "text": s})),
        Some(Value::Array(items)) => {
            for (k, item) in items.iter().enumerate() {
                let p = format!("{param}.content.{k}");
                match block_type(&p, item)? {
                    "text" => parts.push(json!({"type": "text", "text": string_field(&p, item, "text")?})),
                    "image" => parts.push(image_part(&p, item)?),
                    other => return Err(unsupported(&p, other, "text, image")),
                }
            }
        }
        Some(_) => return Err(bad(param, format!("{param}.content: must be a string or an array of blocks"))),
    }
    match b.get("is_error") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        // The chat format has no error flag: say it in words the model reads.
        Some(Value::Bool(true)) => parts.insert(0, json!({"type": "text", "text": "Error: "})),
        Some(_) => return Err(bad(param, format!("{param}.is_error: must be a boolean"))),
    }
    Ok(json!({"role": "tool", "tool_call_id": id, "content": collapse(parts)}))
}

fn tools(tools: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let ts = match tools {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(ts)) => ts,
        Some(_) => return Err(bad("tools", "tools: must be an array")),
    };
    let mut out = Vec::with_capacity(ts.len());
    for (i, t) in ts.iter().enumerate() {
        let p = format!("tools.{i}");
        // Anthropic-defined tools (bash_*, text_editor_*, web_search_*...) have schemas and
        // semantics only Anthropic's service knows.
        if let Some(kind) = t.get("type").and_then(Value::as_str).filter(|k| *k != "custom") {
            return Err(bad(
                &p,
                format!("{p}: tool type {kind:?} is not supported: only client tools {{name, description, input_schema}} are"),
            ));
        }
        let name = string_field(&p, t, "name").ok().filter(|n| !n.is_empty());
        let name = name.ok_or_else(|| bad(&p, format!("{p}.name: must be a non-empty string")))?;
        let schema = t
            .get("input_schema")
            .filter(|s| s.is_object())
            .ok_or_else(|| bad(&p, format!("{p}.input_schema: Field required (a JSON Schema object)")))?;
        // OpenAI's key order: the template renders the function object as JSON, so the order is
        // prompt text, and the same tool sent through either route gives the same tokens.
        let mut function = Map::new();
        function.insert("name".into(), json!(name));
        if let Some(d) = t.get("description").and_then(Value::as_str) {
            function.insert("description".into(), json!(d));
        }
        function.insert("parameters".into(), schema.clone());
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Some(Value::Array(out)))
}

fn tool_choice(choice: Option<&Value>, out: &mut Map<String, Value>) -> Result<(), ApiError> {
    let c = match choice {
        None | Some(Value::Null) => return Ok(()),
        Some(c @ Value::Object(_)) => c,
        Some(_) => return Err(bad("tool_choice", "tool_choice: must be an object with a `type`")),
    };
    let openai = match c.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = string_field("tool_choice", c, "name")?;
            json!({"type": "function", "function": {"name": name}})
        }
        other => {
            return Err(bad("tool_choice", format!("tool_choice.type: must be auto, any, tool or none, got {other:?}")))
        }
    };
    out.insert("tool_choice".into(), openai);
    match c.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(d)) => {
            out.insert("parallel_tool_calls".into(), json!(!d));
        }
        Some(_) => return Err(bad("tool_choice", "tool_choice.disable_parallel_tool_use: must be a boolean")),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Responses

/// The stop sequence that ended a reply: the worker's matched stop string, if the client sent it
/// (`requested` is the chat request's `stop` list).
pub fn stop_sequence(matched: Option<&str>, requested: Option<&Value>) -> Option<String> {
    let matched = matched?;
    let sent = requested.and_then(Value::as_array)?;
    sent.iter().any(|s| s.as_str() == Some(matched)).then(|| matched.to_string())
}

/// (stop_reason, stop_sequence) for a chat `finish_reason`.
fn stop_reason(finish: Option<&str>, stop_sequence: Option<&str>) -> (&'static str, Option<String>) {
    match (finish, stop_sequence) {
        (Some("length"), _) => ("max_tokens", None),
        (Some("tool_calls"), _) => ("tool_use", None),
        (_, Some(s)) => ("stop_sequence", Some(s.to_string())),
        _ => ("end_turn", None),
    }
}

fn tool_input(arguments: &str) -> Value {
    // The tool-call parser always writes a JSON object; anything else has no Anthropic form.
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}

/// A chat completion (one choice) -> a Message.
pub fn message_from_chat(chat: &Value, stop_sequence: Option<&str>) -> Value {
    let choice = &chat["choices"][0];
    let msg = &choice["message"];
    let mut content = Vec::new();
    if let Some(r) = msg["reasoning_content"].as_str().filter(|r| !r.is_empty()) {
        // No signature: nothing here verifies one, and clients send the block back unchanged.
        content.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    // Whitespace between the reasoning and the calls is no answer (streams drop it the same way).
    if let Some(t) = msg["content"].as_str().filter(|t| !t.trim().is_empty()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for call in msg["tool_calls"].as_array().into_iter().flatten() {
        let input = tool_input(call["function"]["arguments"].as_str().unwrap_or(""));
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": input}));
    }
    let (reason, sequence) = stop_reason(choice["finish_reason"].as_str(), stop_sequence);
    json!({
        "id": chat["id"], "type": "message", "role": "assistant", "model": chat["model"], "content": content,
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": chat["usage"]["prompt_tokens"], "output_tokens": chat["usage"]["completion_tokens"]},
    })
}

/// One SSE event: its `event:` name and `data:` object.
pub type Event = (&'static str, Value);

/// `event: <name>\ndata: <json>\n\n`.
pub fn sse_event((name, data): &Event) -> Bytes {
    let mut out = format!("event: {name}\ndata: ").into_bytes();
    out.extend_from_slice(&serde_json::to_vec(data).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    /// A tool call, by its chat `tool_calls[].index`.
    Tool(usize),
}

/// Turns the chat route's chunk stream of one choice into Anthropic's events: `message_start`,
/// then blocks (`content_block_start` / `_delta` / `_stop`, indexes in the order blocks start),
/// then `message_delta` (stop reason, output tokens) and `message_stop` on the usage chunk.
pub struct MessageStream {
    id: String,
    model: String,
    input_tokens: usize,
    started: bool,
    ended: bool,
    open: Option<Block>,
    /// Blocks started so far (the next block's index).
    blocks: usize,
    /// (chat tool-call index, block index).
    tool_blocks: Vec<(usize, usize)>,
    /// Whitespace-only text not yet in a block: it starts a text block only if words follow.
    pending_text: String,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<String>,
}

impl MessageStream {
    pub fn new(id: &str, model: &str, input_tokens: usize) -> Self {
        Self {
            id: id.to_string(),
            model: model.to_string(),
            input_tokens,
            started: false,
            ended: false,
            open: None,
            blocks: 0,
            tool_blocks: Vec::new(),
            pending_text: String::new(),
            stop_reason: None,
            stop_sequence: None,
        }
    }

    /// The stop sequence that ended the reply (see [`stop_sequence`]); set before its last chunk.
    pub fn set_stop_sequence(&mut self, s: Option<String>) {
        self.stop_sequence = s;
    }

    /// The events for one chat chunk.
    pub fn push(&mut self, chunk: &Value) -> Vec<Event> {
        let mut ev = Vec::new();
        if self.ended {
            return ev;
        }
        if !self.started {
            self.started = true;
            ev.push((
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
                }}),
            ));
        }
        if let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) {
            let delta = &choice["delta"];
            if let Some(r) = delta["reasoning_content"].as_str().filter(|r| !r.is_empty()) {
                self.thinking(r, &mut ev);
            }
            if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                self.text(t, &mut ev);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                self.tool(call, &mut ev);
            }
            if let Some(finish) = choice["finish_reason"].as_str() {
                self.close(&mut ev);
                let (reason, sequence) = stop_reason(Some(finish), self.stop_sequence.as_deref());
                self.stop_reason = Some(reason);
                self.stop_sequence = sequence;
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.close(&mut ev);
            ev.push((
                "message_delta",
                json!({"type": "message_delta",
                "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": self.stop_sequence},
                "usage": {"input_tokens": self.input_tokens, "output_tokens": usage["completion_tokens"]}}),
            ));
            ev.push(("message_stop", json!({"type": "message_stop"})));
            self.ended = true;
        }
        ev
    }

    /// The event for a failure after the stream began.
    pub fn error(&self, e: &ApiError) -> Event {
        ("error", error_json(e))
    }

    fn start(&mut self, block: Block, start: Value, ev: &mut Vec<Event>) -> usize {
        self.close(ev);
        let index = self.blocks;
        self.blocks += 1;
        self.open = Some(block);
        ev.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        index
    }

    fn close(&mut self, ev: &mut Vec<Event>) {
        self.pending_text.clear();
        if self.open.take().is_some() {
            ev.push(("content_block_stop", json!({"type": "content_block_stop", "index": self.blocks - 1})));
        }
    }

    fn delta(index: usize, delta: Value) -> Event {
        ("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": delta}))
    }

    fn thinking(&mut self, text: &str, ev: &mut Vec<Event>) {
        if self.open != Some(Block::Thinking) {
            self.start(Block::Thinking, json!({"type": "thinking", "thinking": "", "signature": ""}), ev);
        }
        ev.push(Self::delta(self.blocks - 1, json!({"type": "thinking_delta", "thinking": text})));
    }

    fn text(&mut self, text: &str, ev: &mut Vec<Event>) {
        if self.open != Some(Block::Text) {
            self.pending_text.push_str(text);
            if self.pending_text.trim().is_empty() {
                return;
            }
            let text = std::mem::take(&mut self.pending_text);
            self.start(Block::Text, json!({"type": "text", "text": ""}), ev);
            ev.push(Self::delta(self.blocks - 1, json!({"type": "text_delta", "text": text})));
            return;
        }
        ev.push(Self::delta(self.blocks - 1, json!({"type": "text_delta", "text": text})));
    }

    fn tool(&mut self, call: &Value, ev: &mut Vec<Event>) {
        let Some(call_index) = call["index"].as_u64().map(|i| i as usize) else { return };
        if let Some(id) = call["id"].as_str() {
            let start = json!({"type": "tool_use", "id": id, "name": call["function"]["name"], "input": {}});
            let index = self.start(Block::Tool(call_index), start, ev);
            self.tool_blocks.push((call_index, index));
        }
        let Some(fragment) = call["function"]["arguments"].as_str().filter(|a| !a.is_empty()) else { return };
        // A call's fragments follow its start (the parser never interleaves calls), so this is
        // the open block; a stray fragment still goes to its own call's block.
        if let Some(&(_, index)) = self.tool_blocks.iter().rev().find(|(c, _)| *c == call_index) {
            ev.push(Self::delta(index, json!({"type": "input_json_delta", "partial_json": fragment})));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Anthropic's error `type` for the HTTP status the chat route gives an error.
pub fn error_type(e: &ApiError) -> &'static str {
    match e.status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        // No worker can take it now: what Anthropic's own service calls being overloaded.
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

pub fn error_json(e: &ApiError) -> Value {
    json!({"type": "error", "error": {"type": error_type(e), "message": e.message}})
}

/// The error as an Anthropic response: same status and headers (Retry-After) as the chat route's.
pub fn error_response(e: &ApiError) -> Response {
    e.response_with_body(&error_json(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::params::{self, Endpoint};
    use crate::api::tool_grammar::ForcedToolChoice;
    use crate::preprocess::request::chat_inputs;

    fn req(extra: Value) -> Value {
        let mut body = json!({"model": "m3", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    fn err(body: Value) -> ApiError {
        chat_request(&body).unwrap_err()
    }

    #[test]
    fn plain_request_maps_fields() {
        let chat = chat_request(&req(json!({"system": "Be brief.", "temperature": 0.2, "top_p": 0.9, "top_k": 5,
            "stop_sequences": ["END", "STOP"], "metadata": {"user_id": "session-1"}, "stream": false})))
        .unwrap();
        assert_eq!(
            chat,
            json!({"model": "m3", "messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "top_k": 5,
                "stream": false, "stop": ["END", "STOP"], "user": "session-1"})
        );
        let p = params::parse(&chat, Endpoint::Chat, 1).unwrap();
        assert_eq!(
            (p.max_tokens, p.sampling["top_k"].clone(), p.sampling["stop"].clone()),
            (Some(64), json!(5), json!(["END", "STOP"]))
        );
        assert_eq!(p.user.as_deref(), Some("session-1"));
        assert!(!p.include_usage);
        let p = params::parse(&chat_request(&req(json!({"stream": true}))).unwrap(), Endpoint::Chat, 1).unwrap();
        assert!(p.stream && p.include_usage, "a stream needs the usage chunk for message_delta");
    }

    #[test]
    fn system_blocks_join_and_empty_system_is_none() {
        let chat = chat_request(&req(json!({"system": [{"type": "text", "text": "You are M3."},
            {"type": "text", "text": "\nBe brief.", "cache_control": {"type": "ephemeral"}}]})))
        .unwrap();
        assert_eq!(chat["messages"][0], json!({"role": "system", "content": "You are M3.\nBe brief."}));
        assert_eq!(chat_request(&req(json!({"system": ""}))).unwrap()["messages"][0]["role"], "user");
        assert!(err(req(json!({"system": [{"type": "image"}]}))).message.contains("system.0"));
        assert!(err(req(json!({"system": 3}))).message.contains("system"));
    }

    #[test]
    fn images_become_image_url_parts() {
        let msgs = json!([{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ]}]);
        let chat = chat_request(&req(json!({"messages": msgs}))).unwrap();
        assert_eq!(
            chat["messages"][0],
            json!({"role": "user", "content": [{"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]})
        );
        let inputs = chat_inputs(&chat).unwrap();
        assert_eq!(inputs.image_urls, vec!["data:image/png;base64,iVBORw0K", "https://example.com/cat.jpg"]);
        for (source, what) in [
            (json!({"type": "file", "file_id": "f"}), "source.type"),
            (json!({"type": "base64", "data": "x"}), "media_type"),
            (json!({"type": "url"}), "source.url"),
        ] {
            let m = json!([{"role": "user", "content": [{"type": "image", "source": source}]}]);
            let e = err(req(json!({"messages": m})));
            assert!(e.message.contains(what) && e.status.as_u16() == 400, "{}", e.message);
        }
    }

    #[test]
    fn tool_use_and_tool_result_round_trip() {
        let msgs = json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Need the weather.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": 3}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                 "content": [{"type": "text", "text": "clock "}, {"type": "text", "text": "broken"}]},
                {"type": "text", "text": "Thanks."},
            ]},
        ]);
        let chat = chat_request(&req(json!({"messages": msgs}))).unwrap();
        let m = chat["messages"].as_array().unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[1]["content"], "Let me check.");
        assert_eq!(m[1]["reasoning_content"], "Need the weather.");
        let call = &m[1]["tool_calls"][0];
        assert_eq!((call["id"].as_str(), call["type"].as_str()), (Some("toolu_1"), Some("function")));
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris", "days": 3}));
        assert_eq!(m[2], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"}));
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "toolu_2", "content": "Error: clock broken"}));
        assert_eq!(m[4], json!({"role": "user", "content": "Thanks."}));
        // The chat route's request checks accept it, and hand the template the arguments as a mapping.
        let inputs = chat_inputs(&chat).unwrap();
        assert_eq!(inputs.messages[1]["tool_calls"][0]["function"]["arguments"], json!({"city": "Paris", "days": 3}));
        // A turn of calls only: no text content.
        let only = json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]);
        assert!(chat_request(&req(json!({"messages": only}))).unwrap()["messages"][1]["content"].is_null());
        // Images in a tool result stay parts.
        let img = json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]);
        let chat = chat_request(&req(json!({"messages": img}))).unwrap();
        assert_eq!(chat["messages"][0]["content"][0]["image_url"]["url"], "https://x/y.png");
    }

    #[test]
    fn tools_and_tool_choice_variants() {
        let tools = json!([{"name": "get_weather", "description": "Weather", "input_schema":
            {"type": "object", "properties": {"city": {"type": "string"}}}}]);
        let chat = chat_request(&req(json!({"tools": tools}))).unwrap();
        assert_eq!(
            chat["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters":
                {"type": "object", "properties": {"city": {"type": "string"}}}}}])
        );
        let keys: Vec<&String> = chat["tools"][0]["function"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "description", "parameters"]);
        assert!(chat.get("tool_choice").is_none());
        let parsed = |choice: Value| {
            let chat = chat_request(&req(json!({"tools": tools, "tool_choice": choice}))).unwrap();
            (chat["tool_choice"].clone(), params::parse(&chat, Endpoint::Chat, 1).unwrap())
        };
        let (c, p) = parsed(json!({"type": "auto"}));
        assert_eq!((c, p.forced_tool_choice, p.parse_tool_calls), (json!("auto"), None, true));
        let (c, p) = parsed(json!({"type": "any", "disable_parallel_tool_use": true}));
        assert_eq!(
            (c, p.forced_tool_choice, p.parallel_tool_calls),
            (json!("required"), Some(ForcedToolChoice::Required), false)
        );
        let (c, p) = parsed(json!({"type": "tool", "name": "get_weather"}));
        assert_eq!(c, json!({"type": "function", "function": {"name": "get_weather"}}));
        assert_eq!(p.forced_tool_choice, Some(ForcedToolChoice::Function("get_weather".into())));
        let (c, p) = parsed(json!({"type": "none"}));
        assert_eq!((c, p.parse_tool_calls), (json!("none"), false));
        assert!(err(req(json!({"tools": tools, "tool_choice": {"type": "sometimes"}})))
            .message
            .contains("tool_choice"));
        assert!(err(req(json!({"tools": tools, "tool_choice": "auto"}))).message.contains("tool_choice"));
        assert!(err(req(json!({"tools": tools, "tool_choice": {"type": "tool"}}))).message.contains("name"));
        let e = err(req(json!({"tools": [{"type": "bash_20250124", "name": "bash"}]})));
        assert!(e.message.contains("bash_20250124"), "{}", e.message);
        assert!(err(req(json!({"tools": [{"name": "f"}]}))).message.contains("input_schema"));
    }

    #[test]
    fn bad_shapes_are_400s() {
        for (body, what) in [
            (json!({"model": "m3", "messages": [{"role": "user", "content": "x"}]}), "max_tokens"),
            (req(json!({"messages": []})), "messages"),
            (req(json!({"messages": "hi"})), "messages"),
            (req(json!({"messages": [{"role": "system", "content": "x"}]})), "messages.0.role"),
            (req(json!({"messages": [{"content": "x"}]})), "messages.0.role"),
            (req(json!({"messages": [{"role": "user", "content": 5}]})), "messages.0.content"),
            (req(json!({"messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]})), "\"video\""),
            (req(json!({"messages": [{"role": "user", "content": [{"text": "no type"}]}]})), "type"),
            (req(json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]})), "document"),
            (req(json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]})), "text"),
            (req(json!({"messages": [{"role": "assistant", "content": [{"type": "image", "source": {}}]}]})), "image"),
            (
                req(
                    json!({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]}),
                ),
                "tool_use",
            ),
            (
                req(
                    json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": "x"}]}]}),
                ),
                "input",
            ),
            (req(json!({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]})), "tool_use_id"),
            (
                req(
                    json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "is_error": "yes"}]}]}),
                ),
                "is_error",
            ),
            (req(json!({"stop_sequences": "END"})), "stop_sequences"),
            (req(json!({"thinking": true})), "thinking"),
            (json!([1]), "JSON object"),
        ] {
            let e = err(body.clone());
            assert_eq!(e.status.as_u16(), 400, "{body}");
            assert!(e.message.contains(what), "{body}: {}", e.message);
            assert_eq!(error_json(&e)["error"]["type"], "invalid_request_error");
        }
        // count_tokens needs no max_tokens.
        assert!(count_tokens_request(&json!({"model": "m3", "messages": [{"role": "user", "content": "x"}]})).is_ok());
    }

    #[test]
    fn output_format_becomes_json_schema_decoding() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let chat = chat_request(&req(json!({"output_config": {"effort": "high",
            "format": {"type": "json_schema", "schema": schema}}})))
        .unwrap();
        let p = params::parse(&chat, Endpoint::Chat, 1).unwrap();
        let sent: Value = serde_json::from_str(p.sampling["json_schema"].as_str().unwrap()).unwrap();
        assert_eq!(sent, schema);
        assert!(chat_request(&req(json!({"output_config": {"effort": "low"}})))
            .unwrap()
            .get("response_format")
            .is_none());
        assert!(err(req(json!({"output_config": {"format": {"type": "yaml"}}}))).message.contains("output_config"));
    }

    #[test]
    fn thinking_switch_passes_to_the_template_kwarg() {
        let chat = chat_request(&req(json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}))).unwrap();
        assert_eq!(chat_inputs(&chat).unwrap().kwargs["thinking_mode"], "enabled");
        let chat = chat_request(&req(json!({"thinking": {"type": "disabled"}}))).unwrap();
        assert_eq!(chat_inputs(&chat).unwrap().kwargs["thinking_mode"], "disabled");
    }

    fn completion(message: Value, finish: &str) -> Value {
        json!({"id": "msg_1", "object": "chat.completion", "model": "m3",
               "choices": [{"index": 0, "message": message, "finish_reason": finish}],
               "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}})
    }

    #[test]
    fn response_blocks_and_usage() {
        let chat = completion(
            json!({"role": "assistant", "content": "Let me check.", "reasoning_content": "Need the weather.",
                   "tool_calls": [{"id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
            "tool_calls",
        );
        let m = message_from_chat(&chat, None);
        assert_eq!(
            m,
            json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "m3", "content": [
                {"type": "thinking", "thinking": "Need the weather.", "signature": ""},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}],
                "stop_reason": "tool_use", "stop_sequence": null, "usage": {"input_tokens": 12, "output_tokens": 7}})
        );
        let m = message_from_chat(
            &completion(
                json!({"role": "assistant", "content": "\n", "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]}),
                "tool_calls",
            ),
            None,
        );
        assert_eq!(m["content"].as_array().unwrap().len(), 1, "whitespace is not a text block: {m}");
    }

    #[test]
    fn stop_reasons() {
        let text = json!({"role": "assistant", "content": "Hi"});
        let reason = |finish: &str, seq: Option<&str>| {
            let m = message_from_chat(&completion(text.clone(), finish), seq);
            (m["stop_reason"].as_str().unwrap().to_string(), m["stop_sequence"].clone())
        };
        assert_eq!(reason("stop", None), ("end_turn".into(), Value::Null));
        assert_eq!(reason("stop", Some("END")), ("stop_sequence".into(), json!("END")));
        assert_eq!(reason("length", None), ("max_tokens".into(), Value::Null));
        assert_eq!(reason("tool_calls", None), ("tool_use".into(), Value::Null));
        let sent = json!(["END", "STOP"]);
        assert_eq!(stop_sequence(Some("STOP"), Some(&sent)), Some("STOP".into()));
        assert_eq!(stop_sequence(Some("</s>"), Some(&sent)), None, "only a sequence the client sent");
        assert_eq!(stop_sequence(None, Some(&sent)), None);
        assert_eq!(stop_sequence(Some("END"), None), None);
    }

    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id": "msg_1", "object": "chat.completion.chunk", "model": "m3", "usage": null,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    fn usage_chunk(n: usize) -> Value {
        json!({"id": "msg_1", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": n}})
    }

    /// Runs chunks through a stream translator; returns the events, checking the protocol on the way.
    fn run(chunks: &[Value], stop_seq: Option<&str>) -> Vec<Event> {
        let mut s = MessageStream::new("msg_1", "m3", 12);
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            if i == chunks.len() - 2 {
                s.set_stop_sequence(stop_seq.map(String::from));
            }
            out.extend(s.push(c));
        }
        // Blocks start at consecutive indexes, each delta goes to a started block, each block stops once.
        let mut started = Vec::new();
        let mut stopped = Vec::new();
        for (name, data) in &out {
            assert_eq!(data["type"], *name);
            let index = data["index"].as_u64().map(|i| i as usize);
            match *name {
                "content_block_start" => {
                    assert_eq!(index, Some(started.len()));
                    started.push(index.unwrap());
                }
                "content_block_delta" => {
                    assert!(started.contains(&index.unwrap()) && !stopped.contains(&index.unwrap()))
                }
                "content_block_stop" => {
                    assert!(started.contains(&index.unwrap()) && !stopped.contains(&index.unwrap()));
                    stopped.push(index.unwrap());
                }
                _ => {}
            }
        }
        assert_eq!(started, stopped);
        out
    }

    fn names(ev: &[Event]) -> Vec<&'static str> {
        ev.iter().map(|(n, _)| *n).collect()
    }

    #[test]
    fn stream_text_only() {
        let ev = run(
            &[
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "Hel"}), Value::Null),
                chunk(json!({"content": "lo"}), Value::Null),
                chunk(json!({}), json!("stop")),
                usage_chunk(2),
            ],
            None,
        );
        assert_eq!(
            names(&ev),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let start = &ev[0].1["message"];
        assert_eq!((start["id"].as_str(), start["usage"]["input_tokens"].as_u64()), (Some("msg_1"), Some(12)));
        assert_eq!(start["content"], json!([]));
        assert_eq!(ev[1].1["content_block"], json!({"type": "text", "text": ""}));
        assert_eq!(ev[2].1["delta"], json!({"type": "text_delta", "text": "Hel"}));
        assert_eq!(ev[5].1["delta"], json!({"stop_reason": "end_turn", "stop_sequence": null}));
        assert_eq!(ev[5].1["usage"]["output_tokens"], 2);
        let bytes = sse_event(&ev[2]);
        assert!(bytes.starts_with(b"event: content_block_delta\ndata: {") && bytes.ends_with(b"}\n\n"));
    }

    #[test]
    fn stream_reasoning_then_text_and_stop_sequence() {
        let ev = run(
            &[
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"reasoning_content": "Think"}), Value::Null),
                chunk(json!({"reasoning_content": "ing."}), Value::Null),
                chunk(json!({"content": "\n"}), Value::Null),
                chunk(json!({"content": "Answer"}), Value::Null),
                chunk(json!({}), json!("stop")),
                usage_chunk(5),
            ],
            Some("END"),
        );
        assert_eq!(
            names(&ev),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(ev[1].1["content_block"], json!({"type": "thinking", "thinking": "", "signature": ""}));
        assert_eq!(ev[3].1["delta"], json!({"type": "thinking_delta", "thinking": "ing."}));
        assert_eq!(ev[5].1["index"], 1);
        // Leading whitespace waits for words and goes with them.
        assert_eq!(ev[6].1["delta"], json!({"type": "text_delta", "text": "\nAnswer"}));
        assert_eq!(ev[8].1["delta"], json!({"stop_reason": "stop_sequence", "stop_sequence": "END"}));
    }

    #[test]
    fn stream_tool_call_with_argument_fragments() {
        let ev = run(
            &[
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"reasoning_content": "Need weather."}), Value::Null),
                chunk(json!({"content": "Checking."}), Value::Null),
                chunk(json!({"content": "\n"}), Value::Null),
                chunk(
                    json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                    "function": {"name": "get_weather", "arguments": ""}}]}),
                    Value::Null,
                ),
                chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}), Value::Null),
                chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}), Value::Null),
                chunk(
                    json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"}}]}),
                    Value::Null,
                ),
                chunk(json!({}), json!("tool_calls")),
                usage_chunk(30),
            ],
            None,
        );
        assert_eq!(
            names(&ev),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            ev[6].1["delta"],
            json!({"type": "text_delta", "text": "\n"}),
            "whitespace inside a text block stays"
        );
        assert_eq!(
            ev[8].1,
            json!({"type": "content_block_start", "index": 2,
                   "content_block": {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}})
        );
        let partial: String = ev[9..11]
            .iter()
            .map(|(_, d)| {
                assert_eq!((d["index"].as_u64(), d["delta"]["type"].as_str()), (Some(2), Some("input_json_delta")));
                d["delta"]["partial_json"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(serde_json::from_str::<Value>(&partial).unwrap(), json!({"city": "Paris"}));
        assert_eq!(ev[12].1["content_block"]["id"], "call_b");
        assert_eq!(ev[13].1["delta"]["partial_json"], "{}");
        assert_eq!(ev[15].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(ev[15].1["usage"]["output_tokens"], 30);
    }

    #[test]
    fn stream_cut_by_max_tokens_and_nothing_after_the_end() {
        let mut s = MessageStream::new("msg_1", "m3", 3);
        let mut ev = s.push(&chunk(json!({"role": "assistant", "content": ""}), Value::Null));
        ev.extend(s.push(&chunk(json!({"content": "  "}), Value::Null)));
        ev.extend(s.push(&chunk(json!({}), json!("length"))));
        ev.extend(s.push(&usage_chunk(1)));
        assert_eq!(names(&ev), ["message_start", "message_delta", "message_stop"], "only whitespace: no block");
        assert_eq!(ev[1].1["delta"]["stop_reason"], "max_tokens");
        assert!(s.push(&usage_chunk(1)).is_empty());
        let (name, data) = s.error(&ApiError::upstream("boom"));
        assert_eq!((name, data["error"]["type"].as_str()), ("error", Some("api_error")));
    }

    #[test]
    fn errors_map_by_status() {
        for (e, kind) in [
            (ApiError::invalid("x"), "invalid_request_error"),
            (ApiError::unauthorized("x"), "authentication_error"),
            (ApiError::forbidden("x"), "permission_error"),
            (ApiError::model_not_found("a", "b"), "not_found_error"),
            (ApiError::body_too_large(1), "request_too_large"),
            (ApiError::overloaded("x"), "rate_limit_error"),
            (ApiError::unavailable("x"), "overloaded_error"),
            (ApiError::upstream("x"), "api_error"),
            (ApiError::timeout("x"), "api_error"),
            (ApiError::internal("x"), "api_error"),
        ] {
            let v = error_json(&e);
            assert_eq!(v, json!({"type": "error", "error": {"type": kind, "message": e.message}}));
        }
        let resp = error_response(&ApiError::overloaded("busy"));
        assert_eq!(resp.status().as_u16(), 429);
        assert_eq!(resp.headers()[axum::http::header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()[axum::http::header::CONTENT_TYPE], "application/json");
        assert_eq!(error_response(&ApiError::model_not_found("a", "b")).status().as_u16(), 404);
    }
}
