//! The seam between the HTTP server and request preprocessing: a request body in, token ids (plus
//! the image hand-off for the worker) out.
//!
//! Production uses the checkpoint's chat template, tokenizer and image processor
//! ([`crate::preprocess`], behind [`ModelPromptBuilder`]). [`BytesPromptBuilder`] is a test-only
//! encoder (UTF-8 bytes as token ids) so routing, streaming and failure handling can be tested
//! against fake workers without a checkpoint; it refuses images.

use crate::error::ApiError;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A prompt ready for a worker.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub input_ids: Vec<u32>,
    /// The preprocessed images, in prompt order: the worker's /generate `image_data` (their
    /// hand-off strings, shared with the image cache, are written into the body without a copy).
    pub images: Vec<std::sync::Arc<crate::preprocess::PreparedImage>>,
    /// (token offset, content hash) of each image, so prefix routing tells images apart.
    pub image_salts: Vec<(usize, u64)>,
    /// The rendered prompt ends inside `<mm:think>`: the reply starts with reasoning.
    pub reasoning_prefilled: bool,
    /// The rendered prompt ends with `</mm:think>` (thinking disabled): the reply has no reasoning.
    pub reasoning_closed: bool,
    /// Special-token texts the output parser must drop from replies (see `OutputParser::with_hidden_tokens`).
    pub hidden_output_tokens: std::sync::Arc<[String]>,
}

pub trait PromptBuilder: Send + Sync + 'static {
    /// Render + tokenize a chat request (`messages`, `tools`, template kwargs, images).
    fn chat<'a>(&'a self, body: &'a Value) -> BoxFuture<'a, Result<Prompt, ApiError>>;
    /// Tokenize a completions request's `prompt` (a string or a list of token ids).
    fn completion<'a>(&'a self, body: &'a Value) -> BoxFuture<'a, Result<Prompt, ApiError>>;
    /// Counters of the prepared-image cache, for /metrics (zeros for builders without one).
    fn image_cache_stats(&self) -> crate::preprocess::ImageCacheStats {
        Default::default()
    }
}

/// The `prompt` of /v1/completions as a single string or token-id list (batches are refused).
pub enum CompletionPrompt<'a> {
    Text(&'a str),
    Ids(Vec<u32>),
}

pub fn completion_prompt(body: &Value) -> Result<CompletionPrompt<'_>, ApiError> {
    let bad = || ApiError::invalid_param("prompt", "`prompt` must be a string or an array of token ids");
    match body.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::invalid_param("prompt", "`prompt` is required")),
        Some(Value::String(s)) => Ok(CompletionPrompt::Text(s)),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Ok(CompletionPrompt::Text(items[0].as_str().unwrap_or_default()))
        }
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            let ids = items
                .iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad))
                .collect::<Result<_, _>>()?;
            Ok(CompletionPrompt::Ids(ids))
        }
        Some(Value::Array(items)) if items.len() > 1 => {
            Err(ApiError::invalid_param("prompt", "batched prompts are not supported: send one prompt per request"))
        }
        _ => Err(bad()),
    }
}

/// Test-only: each prompt byte is a token id; chat messages are framed as `<|role|>\ncontent\n`.
pub struct BytesPromptBuilder;

impl BytesPromptBuilder {
    fn render_chat(body: &Value) -> Result<String, ApiError> {
        let messages = body
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::invalid_param("messages", "`messages` must be an array"))?;
        let mut out = String::new();
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match p.get("type").and_then(Value::as_str) {
                            Some("text") => text.push_str(p.get("text").and_then(Value::as_str).unwrap_or("")),
                            Some("image_url") => {
                                return Err(ApiError::invalid_param(
                                    &format!("messages[{i}].content"),
                                    "images need the checkpoint's image processor (tokenizer_mode=model)",
                                ))
                            }
                            other => {
                                return Err(ApiError::invalid_param(
                                    &format!("messages[{i}].content"),
                                    format!("unsupported content part type {other:?}"),
                                ))
                            }
                        }
                    }
                    text
                }
                _ => String::new(),
            };
            out.push_str(&format!("<|{role}|>\n{content}\n"));
        }
        out.push_str("<|assistant|>\n");
        Ok(out)
    }
}

impl PromptBuilder for BytesPromptBuilder {
    fn chat<'a>(&'a self, body: &'a Value) -> BoxFuture<'a, Result<Prompt, ApiError>> {
        Box::pin(async move {
            let text = Self::render_chat(body)?;
            Ok(Prompt { input_ids: text.bytes().map(u32::from).collect(), ..Default::default() })
        })
    }

    fn completion<'a>(&'a self, body: &'a Value) -> BoxFuture<'a, Result<Prompt, ApiError>> {
        Box::pin(async move {
            let input_ids = match completion_prompt(body)? {
                CompletionPrompt::Text(t) => t.bytes().map(u32::from).collect(),
                CompletionPrompt::Ids(ids) => ids,
            };
            Ok(Prompt { input_ids, ..Default::default() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completion_prompt_shapes() {
        assert!(matches!(completion_prompt(&json!({"prompt": "hi"})).unwrap(), CompletionPrompt::Text("hi")));
        assert!(
            matches!(completion_prompt(&json!({"prompt": [1, 2]})).unwrap(), CompletionPrompt::Ids(v) if v == vec![1, 2])
        );
        let e = completion_prompt(&json!({"prompt": ["a", "b"]})).err().unwrap();
        assert!(e.message.contains("batched"), "{}", e.message);
        assert_eq!(completion_prompt(&json!({})).err().unwrap().param.as_deref(), Some("prompt"));
        assert!(completion_prompt(&json!({"prompt": [1, -2]})).is_err());
    }

    #[tokio::test]
    async fn bytes_builder_frames_messages_and_refuses_images() {
        let b = BytesPromptBuilder;
        let p = b.chat(&json!({"messages": [{"role": "user", "content": "hi"}]})).await.unwrap();
        assert_eq!(
            String::from_utf8(p.input_ids.iter().map(|&x| x as u8).collect()).unwrap(),
            "<|user|>\nhi\n<|assistant|>\n"
        );
        let img =
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]});
        assert_eq!(b.chat(&img).await.unwrap_err().status.as_u16(), 400);
    }
}
