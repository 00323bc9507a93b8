//! OpenAI chat request body -> what the chat template needs, plus the images it references.
//!
//! Validates the shape of `messages` (clear 400s for what is wrong), collects image URLs in prompt
//! order, and normalizes the few things HF-style templates expect differently from the OpenAI
//! wire format: tool-call `arguments` arrive as JSON *text* but templates iterate them as a
//! mapping, and OpenAI's thinking switches map onto M3's `thinking_mode` template kwarg.

use serde_json::{Map, Value};

use super::error::PreprocessError;

/// Template inputs of one chat request.
#[derive(Debug, Clone)]
pub struct ChatInputs {
    pub messages: Value,
    pub tools: Option<Value>,
    pub add_generation_prompt: bool,
    pub kwargs: Map<String, Value>,
    /// Image URLs (`data:` or http(s)) in the order the template will emit their placeholders.
    pub image_urls: Vec<String>,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub fn chat_inputs(body: &Value) -> Result<ChatInputs, PreprocessError> {
    let obj = body.as_object().ok_or_else(|| PreprocessError::bad_request("the request body must be a JSON object"))?;
    let messages = obj
        .get("messages")
        .ok_or_else(|| PreprocessError::bad_param("messages", "`messages` is required"))?
        .as_array()
        .ok_or_else(|| PreprocessError::bad_param("messages", "`messages` must be an array"))?;
    if messages.is_empty() {
        return Err(PreprocessError::bad_param("messages", "`messages` must not be empty"));
    }
    let mut image_urls = Vec::new();
    let mut normalized = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        normalized.push(normalize_message(i, m, &mut image_urls)?);
    }

    let tool_choice_none = obj.get("tool_choice").and_then(Value::as_str) == Some("none");
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(t)) if t.is_empty() => None,
        Some(Value::Array(t)) => {
            for (i, tool) in t.iter().enumerate() {
                let name = tool.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
                if name.is_none_or(str::is_empty) {
                    return Err(PreprocessError::bad_param("tools", format!("tools[{i}].function.name is required")));
                }
            }
            // With tool_choice "none" the model must not see the tools, so it cannot call them.
            (!tool_choice_none).then(|| Value::Array(t.clone()))
        }
        Some(_) => return Err(PreprocessError::bad_param("tools", "`tools` must be an array")),
    };

    let mut kwargs = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(PreprocessError::bad_param("chat_template_kwargs", "must be an object")),
    };
    if !kwargs.contains_key("thinking_mode") {
        if let Some(mode) = thinking_mode_from_openai(obj) {
            kwargs.insert("thinking_mode".into(), Value::String(mode.into()));
        }
    }
    let continue_final = obj.get("continue_final_message").and_then(Value::as_bool).unwrap_or(false);
    let add_generation_prompt = obj.get("add_generation_prompt").and_then(Value::as_bool).unwrap_or(!continue_final);
    Ok(ChatInputs { messages: Value::Array(normalized), tools, add_generation_prompt, kwargs, image_urls })
}

/// `thinking: {type}` (Anthropic-style, accepted by several OpenAI-compatible servers) or
/// `reasoning_effort` none/minimal -> M3's `thinking_mode`.
fn thinking_mode_from_openai(obj: &Map<String, Value>) -> Option<&'static str> {
    match obj.get("thinking").and_then(|t| t.get("type")).and_then(Value::as_str) {
        Some("enabled") => return Some("enabled"),
        Some("disabled") => return Some("disabled"),
        _ => {}
    }
    match obj.get("reasoning_effort").and_then(Value::as_str) {
        Some("none") | Some("minimal") => Some("disabled"),
        Some("low") | Some("medium") | Some("high") => Some("enabled"),
        _ => None,
    }
}

fn normalize_message(i: usize, m: &Value, image_urls: &mut Vec<String>) -> Result<Value, PreprocessError> {
    let param = format!("messages[{i}]");
    let obj = m.as_object().ok_or_else(|| PreprocessError::bad_param(&param, format!("{param} must be an object")))?;
    let role = obj
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| PreprocessError::bad_param(&param, format!("{param}.role is required")))?;
    if !ROLES.contains(&role) {
        return Err(PreprocessError::bad_param(
            &param,
            format!("{param}.role {role:?} is not one of system, developer, user, assistant, tool"),
        ));
    }
    let mut out = obj.clone();
    match obj.get("content") {
        // Only an assistant turn may omit content (e.g. one that only calls tools).
        None | Some(Value::Null) => {
            if role != "assistant" {
                return Err(PreprocessError::bad_param(&param, format!("{param}.content is required")));
            }
        }
        Some(Value::String(_)) => {}
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                check_part(&format!("{param}.content[{j}]"), role, part, image_urls)?;
            }
        }
        Some(_) => {
            return Err(PreprocessError::bad_param(
                &param,
                format!("{param}.content must be a string or an array of parts"),
            ))
        }
    }
    if let Some(calls) = obj.get("tool_calls") {
        let calls = calls
            .as_array()
            .ok_or_else(|| PreprocessError::bad_param(&param, format!("{param}.tool_calls must be an array")))?;
        let mut fixed = Vec::with_capacity(calls.len());
        for (j, call) in calls.iter().enumerate() {
            let mut call = call.clone();
            let func = call.get_mut("function").and_then(Value::as_object_mut).ok_or_else(|| {
                PreprocessError::bad_param(&param, format!("{param}.tool_calls[{j}].function is required"))
            })?;
            if let Some(Value::String(args)) = func.get("arguments") {
                // Templates render arguments key by key; OpenAI sends them as JSON text.
                if let Ok(parsed @ Value::Object(_)) = serde_json::from_str::<Value>(args) {
                    func.insert("arguments".into(), parsed);
                }
            }
            fixed.push(call);
        }
        out.insert("tool_calls".into(), Value::Array(fixed));
    }
    Ok(Value::Object(out))
}

fn check_part(param: &str, role: &str, part: &Value, image_urls: &mut Vec<String>) -> Result<(), PreprocessError> {
    let kind = part
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| PreprocessError::bad_param(param, format!("{param}.type is required")))?;
    match kind {
        "text" => {
            if !part.get("text").is_some_and(Value::is_string) {
                return Err(PreprocessError::bad_param(param, format!("{param}.text must be a string")));
            }
        }
        "image_url" | "image" => {
            if role != "user" && role != "tool" && role != "system" {
                return Err(PreprocessError::bad_param(param, format!("images are not allowed in {role} messages")));
            }
            let url = match (part.get("image_url"), part.get("image"), part.get("url")) {
                (Some(Value::Object(o)), _, _) => o.get("url").and_then(Value::as_str),
                (Some(Value::String(s)), _, _) => Some(s.as_str()),
                (None, Some(Value::String(s)), _) => Some(s.as_str()),
                (None, None, Some(Value::String(s))) => Some(s.as_str()),
                _ => None,
            };
            let url =
                url.ok_or_else(|| PreprocessError::bad_param(param, format!("{param}.image_url.url is required")))?;
            image_urls.push(url.to_string());
        }
        other => {
            return Err(PreprocessError::bad_param(
                param,
                format!("{param}.type {other:?} is not supported (text and image_url are)"),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn collects_images_and_parses_arguments() {
        let body = json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}
        ], "reasoning_effort": "none"});
        let inputs = chat_inputs(&body).unwrap();
        assert_eq!(inputs.image_urls, vec!["data:x"]);
        assert_eq!(inputs.messages[1]["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(inputs.kwargs["thinking_mode"], json!("disabled"));
        assert!(inputs.add_generation_prompt);
    }

    #[test]
    fn clear_errors() {
        let err = |b: Value| chat_inputs(&b).unwrap_err().to_string();
        assert!(err(json!({})).contains("`messages` is required"));
        assert!(err(json!({"messages": []})).contains("must not be empty"));
        assert!(err(json!({"messages": [{"role": "wizard", "content": "x"}]})).contains("\"wizard\""));
        assert!(
            err(json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})).contains("input_audio")
        );
        assert!(err(json!({"messages": [{"role": "user"}]})).contains("content is required"));
    }
}
