//! OpenAI response objects: usage, logprobs, finish reasons, ids.

use crate::workers::client::{Finish, TokenLogprob};
use serde_json::{json, Value};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub reasoning_tokens: usize,
}

impl Usage {
    pub fn to_json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        })
    }
}

/// OpenAI finish_reason; a reply that called tools and stopped normally reports `tool_calls`.
pub fn finish_reason(finish: Option<&Finish>, called_tools: bool) -> &'static str {
    match finish {
        Some(Finish::Length) => "length",
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

fn token_json(token: &str, logprob: f64) -> Value {
    // JSON has no -inf; OpenAI reports -9999.0 for "impossible".
    let lp = if logprob.is_finite() { logprob } else { -9999.0 };
    json!({"token": token, "logprob": lp, "bytes": token.as_bytes()})
}

/// Chat `choices[].logprobs`: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`.
pub fn chat_logprobs(lps: &[TokenLogprob], top: usize) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut v = token_json(&t.token, t.logprob);
            let tops: Vec<Value> = t.top.iter().take(top).map(|(tok, lp)| token_json(tok, *lp)).collect();
            v["top_logprobs"] = Value::Array(tops);
            v
        })
        .collect();
    json!({ "content": content })
}

/// Completions `choices[].logprobs`: parallel arrays, `text_offset` counted from `offset`.
pub fn completion_logprobs(lps: &[TokenLogprob], top: usize, offset: usize) -> Value {
    let mut pos = offset;
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let mut text_offset = Vec::new();
    for t in lps {
        tokens.push(json!(t.token));
        token_logprobs.push(json!(if t.logprob.is_finite() { t.logprob } else { -9999.0 }));
        let mut m = serde_json::Map::new();
        for (tok, lp) in t.top.iter().take(top) {
            m.insert(tok.clone(), json!(lp));
        }
        top_logprobs.push(Value::Object(m));
        text_offset.push(json!(pos));
        pos += t.token.len();
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset})
}

/// A fresh id like `chatcmpl-<32 hex>`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_and_finish() {
        let u = Usage { prompt_tokens: 10, completion_tokens: 5, cached_tokens: 8, reasoning_tokens: 2 };
        let v = u.to_json();
        assert_eq!(v["total_tokens"], 15);
        assert_eq!(v["prompt_tokens_details"]["cached_tokens"], 8);
        assert_eq!(finish_reason(Some(&Finish::Stop), true), "tool_calls");
        assert_eq!(finish_reason(Some(&Finish::Length), true), "length");
        assert_eq!(finish_reason(None, false), "stop");
    }

    #[test]
    fn logprob_shapes() {
        let lps = vec![TokenLogprob {
            token: "hi".into(),
            logprob: -0.1,
            top: vec![("hi".into(), -0.1), ("ho".into(), -2.0)],
        }];
        let c = chat_logprobs(&lps, 1);
        assert_eq!(c["content"][0]["top_logprobs"].as_array().unwrap().len(), 1);
        assert_eq!(c["content"][0]["bytes"], json!([104, 105]));
        let t = completion_logprobs(&lps, 2, 3);
        assert_eq!(t["text_offset"], json!([3]));
        assert_eq!(t["top_logprobs"][0]["ho"], -2.0);
    }
}
