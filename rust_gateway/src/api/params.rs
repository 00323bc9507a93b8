//! OpenAI request fields -> validated generation parameters and SGLang `sampling_params`.
//!
//! Validation names the offending field (`param`) and the accepted range, so a client sees why a
//! request was refused. Unknown fields are ignored, as OpenAI-compatible servers do.

use super::tool_grammar::ForcedToolChoice;
use crate::error::ApiError;
use serde_json::{json, Map, Value};

/// Which endpoint the request came in on (field meanings differ slightly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

#[derive(Debug, Clone)]
pub struct GenParams {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub n: usize,
    /// `max_completion_tokens` / `max_tokens` as sent (None: fill from the context left).
    pub max_tokens: Option<usize>,
    /// SGLang sampling params except `max_new_tokens` (set once the prompt length is known).
    pub sampling: Map<String, Value>,
    pub seed: Option<i64>,
    /// Return per-token logprobs; `top_logprobs` alternatives each.
    pub logprobs: bool,
    pub top_logprobs: usize,
    /// `tools` when tool calls should be parsed (absent or `tool_choice: "none"` -> None).
    pub tools: Option<Value>,
    pub parse_tool_calls: bool,
    /// `tool_choice` "required" or a named function (chat only): the worker is constrained to tool
    /// calls by a grammar built once the prompt is rendered (`tool_grammar::tool_call_grammar`).
    pub forced_tool_choice: Option<ForcedToolChoice>,
    /// `parallel_tool_calls` (default true): false limits a forced reply to one call.
    pub parallel_tool_calls: bool,
    /// Split `<mm:think>` into `reasoning_content` (SGLang's `separate_reasoning`, default on).
    pub separate_reasoning: bool,
    /// The `user` field (a session key when no `x-session-id` header is sent).
    pub user: Option<String>,
}

fn number(body: &Value, key: &str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| ApiError::invalid_param(key, format!("`{key}` must be a number")))
        }
    }
}

fn in_range(body: &Value, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    let v = number(body, key)?;
    if let Some(x) = v {
        if !(lo..=hi).contains(&x) {
            return Err(ApiError::invalid_param(key, format!("`{key}` must be between {lo} and {hi}, got {x}")));
        }
    }
    Ok(v)
}

fn integer(body: &Value, key: &str) -> Result<Option<i64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_i64().map(Some).ok_or_else(|| ApiError::invalid_param(key, format!("`{key}` must be an integer")))
        }
    }
}

fn boolean(body: &Value, key: &str) -> Result<Option<bool>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid_param(key, format!("`{key}` must be a boolean"))),
    }
}

fn positive(body: &Value, key: &str) -> Result<Option<usize>, ApiError> {
    match integer(body, key)? {
        None => Ok(None),
        Some(x) if x >= 1 => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::invalid_param(key, format!("`{key}` must be at least 1, got {x}"))),
    }
}

/// Parse everything but the prompt itself. `max_n` bounds `n`.
pub fn parse(body: &Value, endpoint: Endpoint, max_n: usize) -> Result<GenParams, ApiError> {
    if !body.is_object() {
        return Err(ApiError::invalid("The request body must be a JSON object."));
    }
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        None | Some(Value::Null) => return Err(ApiError::invalid_param("model", "you must provide a model parameter")),
        _ => return Err(ApiError::invalid_param("model", "`model` must be a non-empty string")),
    };
    let stream = boolean(body, "stream")?.unwrap_or(false);
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid_param("stream_options.include_usage", "must be a boolean")),
        },
        Some(_) => return Err(ApiError::invalid_param("stream_options", "`stream_options` must be an object")),
    };
    let n = positive(body, "n")?.unwrap_or(1);
    if n > max_n {
        return Err(ApiError::invalid_param("n", format!("`n` must be at most {max_n}, got {n}")));
    }
    let max_tokens = match positive(body, "max_completion_tokens")? {
        Some(x) => Some(x),
        None => positive(body, "max_tokens")?,
    };

    let mut s = Map::new();
    if let Some(t) = in_range(body, "temperature", 0.0, 2.0)? {
        s.insert("temperature".into(), json!(t));
    }
    if let Some(p) = number(body, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid_param("top_p", format!("`top_p` must be in (0, 1], got {p}")));
        }
        s.insert("top_p".into(), json!(p));
    }
    if let Some(k) = integer(body, "top_k")? {
        if k == 0 || k < -1 {
            return Err(ApiError::invalid_param("top_k", format!("`top_k` must be -1 (off) or at least 1, got {k}")));
        }
        s.insert("top_k".into(), json!(if k == -1 { 1 << 30 } else { k }));
    }
    if let Some(m) = in_range(body, "min_p", 0.0, 1.0)? {
        s.insert("min_p".into(), json!(m));
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = in_range(body, key, -2.0, 2.0)? {
            s.insert(key.into(), json!(x));
        }
    }
    if let Some(r) = in_range(body, "repetition_penalty", 0.0, 2.0)? {
        s.insert("repetition_penalty".into(), json!(r));
    }
    if let Some(m) = integer(body, "min_tokens")? {
        s.insert("min_new_tokens".into(), json!(m.max(0)));
    }
    if let Some(b) = boolean(body, "ignore_eos")? {
        s.insert("ignore_eos".into(), json!(b));
    }
    match body.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(x)) if !x.is_empty() => {
            s.insert("stop".into(), json!([x]));
        }
        Some(Value::Array(xs)) if xs.len() <= 16 && xs.iter().all(|x| x.as_str().is_some_and(|t| !t.is_empty())) => {
            if !xs.is_empty() {
                s.insert("stop".into(), Value::Array(xs.clone()));
            }
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` must be a non-empty string or an array of at most 16 of them",
            ))
        }
    }
    let seed = integer(body, "seed")?;
    if let Some(seed) = seed {
        s.insert("sampling_seed".into(), json!(seed));
    }
    match body.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            let mut bias = Map::new();
            for (k, v) in m {
                let ok_key = k.parse::<u32>().is_ok();
                let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b));
                match (ok_key, b) {
                    (true, Some(b)) => {
                        bias.insert(k.clone(), json!(b));
                    }
                    _ => {
                        return Err(ApiError::invalid_param(
                            "logit_bias",
                            format!("`logit_bias` maps token ids to numbers in [-100, 100]; bad entry {k:?}: {v}"),
                        ))
                    }
                }
            }
            s.insert("logit_bias".into(), Value::Object(bias));
        }
        Some(_) => return Err(ApiError::invalid_param("logit_bias", "`logit_bias` must be an object")),
    }
    constrained_decoding(body, &mut s)?;
    // M3's reasoning and tool-call markers are special tokens: keep them in the text for the parsers,
    // and do not pad them with spaces.
    if endpoint == Endpoint::Chat {
        s.insert("skip_special_tokens".into(), json!(false));
        s.insert("spaces_between_special_tokens".into(), json!(false));
    }

    let (logprobs, top_logprobs) = match endpoint {
        Endpoint::Chat => {
            let lp = boolean(body, "logprobs")?.unwrap_or(false);
            let top = match integer(body, "top_logprobs")? {
                None => 0,
                Some(k) if (0..=20).contains(&k) => k as usize,
                Some(k) => {
                    return Err(ApiError::invalid_param(
                        "top_logprobs",
                        format!("`top_logprobs` must be between 0 and 20, got {k}"),
                    ))
                }
            };
            if top > 0 && !lp {
                return Err(ApiError::invalid_param("top_logprobs", "`top_logprobs` needs `logprobs: true`"));
            }
            (lp, top)
        }
        // /v1/completions: `logprobs` is the number of alternatives (0..=5), null for none.
        Endpoint::Completion => match integer(body, "logprobs")? {
            None => (false, 0),
            Some(k) if (0..=5).contains(&k) => (true, k as usize),
            Some(k) => {
                return Err(ApiError::invalid_param("logprobs", format!("`logprobs` must be between 0 and 5, got {k}")))
            }
        },
    };
    if endpoint == Endpoint::Completion && boolean(body, "echo")?.unwrap_or(false) {
        return Err(ApiError::invalid_param("echo", "`echo` is not supported"));
    }

    let (tools, parse_tool_calls, forced) = tools_and_choice(body)?;
    let forced_tool_choice = forced.filter(|_| endpoint == Endpoint::Chat);
    if forced_tool_choice.is_some() {
        if let Some(other) = ["json_schema", "regex", "ebnf"].into_iter().find(|k| s.contains_key(*k)) {
            let what = if other == "json_schema" { "response_format" } else { other };
            return Err(ApiError::invalid_param(
                "tool_choice",
                format!(
                    "`tool_choice` \"required\" or a named function constrains the reply to tool calls and cannot \
                     be combined with `{what}`"
                ),
            ));
        }
    }
    let parallel_tool_calls = boolean(body, "parallel_tool_calls")?.unwrap_or(true);
    let separate_reasoning = boolean(body, "separate_reasoning")?.unwrap_or(true);
    let user = match body.get("user") {
        Some(Value::String(u)) if !u.is_empty() => Some(u.clone()),
        _ => None,
    };
    Ok(GenParams {
        model,
        stream,
        include_usage,
        n,
        max_tokens,
        sampling: s,
        seed,
        logprobs,
        top_logprobs,
        tools,
        parse_tool_calls,
        forced_tool_choice,
        parallel_tool_calls,
        separate_reasoning,
        user,
    })
}

/// `response_format` (and SGLang's `regex` / `ebnf` extras) -> the worker's constrained decoding.
fn constrained_decoding(body: &Value, s: &mut Map<String, Value>) -> Result<(), ApiError> {
    match body.get("response_format") {
        None | Some(Value::Null) => {}
        Some(rf) => match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                s.insert("json_schema".into(), json!(r#"{"type":"object"}"#));
            }
            Some("json_schema") => {
                let schema = rf.pointer("/json_schema/schema").filter(|v| v.is_object()).ok_or_else(|| {
                    ApiError::invalid_param(
                        "response_format.json_schema.schema",
                        "a json_schema response_format needs `json_schema.schema` (an object)",
                    )
                })?;
                s.insert("json_schema".into(), json!(schema.to_string()));
            }
            other => {
                return Err(ApiError::invalid_param(
                    "response_format.type",
                    format!("`response_format.type` must be text, json_object or json_schema, got {other:?}"),
                ))
            }
        },
    }
    for key in ["regex", "ebnf"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(x)) => {
                if s.contains_key("json_schema") || s.contains_key("regex") || s.contains_key("ebnf") {
                    return Err(ApiError::invalid_param(
                        key,
                        "only one of response_format, regex and ebnf may be given",
                    ));
                }
                s.insert(key.into(), json!(x));
            }
            Some(_) => return Err(ApiError::invalid_param(key, format!("`{key}` must be a string"))),
        }
    }
    Ok(())
}

/// (tools for the parser, whether to parse tool calls, the tool choice to enforce).
type ToolsAndChoice = (Option<Value>, bool, Option<ForcedToolChoice>);

/// Validate `tools` and `tool_choice`.
fn tools_and_choice(body: &Value) -> Result<ToolsAndChoice, ApiError> {
    let tools = match body.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(ts)) => {
            for (i, t) in ts.iter().enumerate() {
                let name = t.pointer("/function/name").and_then(Value::as_str);
                if t.get("type").and_then(Value::as_str) != Some("function") || name.is_none_or(str::is_empty) {
                    return Err(ApiError::invalid_param(
                        &format!("tools[{i}]"),
                        "each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}",
                    ));
                }
            }
            Some(Value::Array(ts.clone()))
        }
        Some(_) => return Err(ApiError::invalid_param("tools", "`tools` must be an array")),
    };
    let names: Vec<&str> = tools
        .as_ref()
        .and_then(Value::as_array)
        .map(|ts| ts.iter().filter_map(|t| t.pointer("/function/name").and_then(Value::as_str)).collect())
        .unwrap_or_default();
    let (parse, forced) = match body.get("tool_choice") {
        None | Some(Value::Null) => (true, None),
        Some(Value::String(c)) => match c.as_str() {
            "none" => (false, None),
            "auto" => (true, None),
            "required" if !names.is_empty() => (true, Some(ForcedToolChoice::Required)),
            "required" => {
                return Err(ApiError::invalid_param("tool_choice", "`tool_choice: required` needs a non-empty `tools`"))
            }
            other => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` must be none, auto, required or a function, got {other:?}"),
                ))
            }
        },
        Some(obj @ Value::Object(_)) => {
            let name = obj.pointer("/function/name").and_then(Value::as_str).unwrap_or("");
            if !names.contains(&name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("`tool_choice` names function {name:?}, which is not in `tools`"),
                ));
            }
            (true, Some(ForcedToolChoice::Function(name.to_string())))
        }
        Some(_) => return Err(ApiError::invalid_param("tool_choice", "`tool_choice` must be a string or an object")),
    };
    Ok((tools, parse, forced))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: Value) -> Result<GenParams, ApiError> {
        let mut body = json!({"model": "m", "messages": []});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        parse(&body, Endpoint::Chat, 8)
    }

    #[test]
    fn maps_sampling_fields_to_sglang_names() {
        let p = chat(json!({"temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "END", "max_tokens": 10,
            "max_completion_tokens": 20, "logprobs": true, "top_logprobs": 3, "n": 2}))
        .unwrap();
        assert_eq!(p.sampling["temperature"], 0.5);
        assert_eq!(p.sampling["sampling_seed"], 7);
        assert_eq!(p.sampling["stop"], json!(["END"]));
        assert_eq!(p.sampling["skip_special_tokens"], false);
        assert_eq!(p.max_tokens, Some(20), "max_completion_tokens wins over max_tokens");
        assert_eq!((p.logprobs, p.top_logprobs, p.n), (true, 3, 2));
    }

    #[test]
    fn response_format_becomes_json_schema() {
        let p = chat(json!({"response_format": {"type": "json_object"}})).unwrap();
        assert_eq!(p.sampling["json_schema"], r#"{"type":"object"}"#);
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let p =
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}))
                .unwrap();
        let back: Value = serde_json::from_str(p.sampling["json_schema"].as_str().unwrap()).unwrap();
        assert_eq!(back["properties"]["a"]["type"], "integer");
        assert!(chat(json!({"response_format": {"type": "json_schema"}})).is_err());
        assert!(chat(json!({"response_format": {"type": "yaml"}})).is_err());
    }

    #[test]
    fn invalid_fields_are_named() {
        for (extra, param) in [
            (json!({"temperature": 5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"n": 9}), "n"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"stop": 3}), "stop"),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
            (json!({"tool_choice": "sometimes"}), "tool_choice"),
            (json!({"tools": [{"type": "function"}]}), "tools[0]"),
            (json!({"stream": "yes"}), "stream"),
        ] {
            let e = chat(extra.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
            assert_eq!(e.status.as_u16(), 400);
        }
        let e = parse(&json!({"messages": []}), Endpoint::Chat, 1).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(parse(&json!([1]), Endpoint::Chat, 1).is_err());
    }

    #[test]
    fn tool_choice_rules() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        let p = chat(json!({"tools": tools, "tool_choice": "none"})).unwrap();
        assert!(!p.parse_tool_calls);
        let p = chat(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}})).unwrap();
        assert!(p.parse_tool_calls && p.tools.is_some());
        assert!(chat(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}})).is_err());
        assert!(chat(json!({"tool_choice": "required"})).is_err());
        assert!(chat(json!({"tools": [], "tool_choice": "required"})).is_err());
        assert_eq!(chat(json!({"tools": tools})).unwrap().forced_tool_choice, None);
        let p = chat(json!({"tools": tools, "tool_choice": "required", "parallel_tool_calls": false})).unwrap();
        assert_eq!(p.forced_tool_choice, Some(ForcedToolChoice::Required));
        assert!(!p.parallel_tool_calls);
        let p = chat(json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}})).unwrap();
        assert_eq!(p.forced_tool_choice, Some(ForcedToolChoice::Function("f".into())));
        assert!(p.parallel_tool_calls && !p.sampling.contains_key("ebnf"), "the grammar comes with the prompt");
    }

    #[test]
    fn forced_tool_choice_conflicts_with_other_constraints() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        for (extra, what) in [
            (json!({"response_format": {"type": "json_object"}}), "response_format"),
            (json!({"ebnf": "root ::= \"x\""}), "ebnf"),
            (json!({"regex": "x+"}), "regex"),
        ] {
            let mut body = extra.clone();
            body["tools"] = tools.clone();
            body["tool_choice"] = json!("required");
            let e = chat(body).unwrap_err();
            assert_eq!((e.param.as_deref(), e.status.as_u16()), (Some("tool_choice"), 400));
            assert!(e.message.contains(what), "{}", e.message);
            // Without a forced choice the same constraint is fine.
            let mut body = extra;
            body["tools"] = tools.clone();
            assert!(chat(body).is_ok());
        }
    }

    #[test]
    fn completion_logprobs_is_a_count() {
        let p = parse(&json!({"model": "m", "prompt": "x", "logprobs": 2}), Endpoint::Completion, 1).unwrap();
        assert_eq!((p.logprobs, p.top_logprobs), (true, 2));
        assert!(!p.sampling.contains_key("skip_special_tokens"));
        assert!(parse(&json!({"model": "m", "prompt": "x", "logprobs": 9}), Endpoint::Completion, 1).is_err());
    }
}
