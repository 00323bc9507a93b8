//! The production [`PromptBuilder`]: the checkpoint's chat template, tokenizer and image processor
//! from [`crate::preprocess`], adapted to the server (errors -> OpenAI errors, the image hand-off
//! -> extra /generate fields, image content -> routing salts).

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::parsers::reasoning::THINK_END;
use crate::preprocess::{
    ImageCacheStats, PreparedPrompt, PreprocessConfig, PreprocessError, Preprocessor, IMAGE_TOKEN,
};
use crate::prompt::{BoxFuture, Prompt, PromptBuilder};
use axum::http::StatusCode;
use serde_json::Value;

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        let code = match &e {
            PreprocessError::PromptTooLong { .. } => Some("context_length_exceeded"),
            _ => None,
        };
        let mut api =
            if e.status() >= 500 { ApiError::internal(e.to_string()) } else { ApiError::invalid(e.to_string()) };
        api.status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
        api.param = e.param().map(String::from);
        api.code = code.map(String::from);
        api
    }
}

pub struct ModelPromptBuilder {
    pre: Preprocessor,
    image_token: Option<u32>,
    hidden_output_tokens: std::sync::Arc<[String]>,
}

/// The tokenizer's special tokens that must not appear in a reply: every special added token except
/// the reasoning and tool-call markers the output parser consumes.
fn hidden_output_tokens(tokenizer: &tokenizers::Tokenizer) -> std::sync::Arc<[String]> {
    use crate::parsers::{reasoning, xml_args};
    let keep = [reasoning::THINK_START, reasoning::THINK_END, xml_args::NS];
    let mut hidden: Vec<String> = tokenizer
        .get_added_tokens_decoder()
        .values()
        .filter(|t| t.special && !keep.contains(&t.content.as_str()))
        .map(|t| t.content.clone())
        .collect();
    hidden.sort();
    hidden.into()
}

impl ModelPromptBuilder {
    pub fn load(cfg: &GatewayConfig) -> Result<Self, String> {
        let dir = cfg.model_path.as_deref().ok_or("model_path is required")?;
        let mut pc = PreprocessConfig::default();
        pc.fetch.allow_private = cfg.allow_private_image_urls;
        pc.image_cache_bytes = cfg.image_cache_bytes;
        if cfg.context_length.is_some() {
            pc.max_prompt_tokens = cfg.context_length;
        }
        let pre =
            Preprocessor::load_with_config(dir, pc).map_err(|e| format!("cannot load the checkpoint at {dir}: {e}"))?;
        let image_token = pre.cached_tokenizer().token_id(IMAGE_TOKEN);
        let hidden_output_tokens = hidden_output_tokens(pre.tokenizer());
        Ok(Self { pre, image_token, hidden_output_tokens })
    }

    fn to_prompt(&self, p: PreparedPrompt) -> Prompt {
        Prompt {
            image_salts: self.image_salts(&p),
            reasoning_closed: p.text.trim_end().ends_with(THINK_END),
            input_ids: p.input_ids,
            images: p.images,
            reasoning_prefilled: p.reasoning_prefilled,
            hidden_output_tokens: self.hidden_output_tokens.clone(),
        }
    }

    /// (offset of the k-th run of image placeholder tokens, hash of the k-th image's pixels).
    fn image_salts(&self, p: &PreparedPrompt) -> Vec<(usize, u64)> {
        let (Some(tok), false) = (self.image_token, p.images.is_empty()) else { return Vec::new() };
        let mut starts = Vec::new();
        for (i, id) in p.input_ids.iter().enumerate() {
            if *id == tok && (i == 0 || p.input_ids[i - 1] != tok) {
                starts.push(i);
            }
        }
        starts.into_iter().zip(&p.images).map(|(off, img)| (off, img.pixel_hash)).collect()
    }
}

impl PromptBuilder for ModelPromptBuilder {
    fn chat<'a>(&'a self, body: &'a Value) -> BoxFuture<'a, Result<Prompt, ApiError>> {
        Box::pin(async move { Ok(self.to_prompt(self.pre.prepare_chat(body).await?)) })
    }

    fn completion<'a>(&'a self, body: &'a Value) -> BoxFuture<'a, Result<Prompt, ApiError>> {
        Box::pin(async move { Ok(self.to_prompt(self.pre.prepare_completion(body)?)) })
    }

    fn image_cache_stats(&self) -> ImageCacheStats {
        self.pre.image_cache().stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_errors_map_to_openai_errors() {
        let e: ApiError = PreprocessError::image(1, "truncated PNG").into();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.contains("truncated PNG"));
        let e: ApiError = PreprocessError::PromptTooLong { tokens: 10, limit: 5 }.into();
        assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
        let e: ApiError = PreprocessError::Internal("x".into()).into();
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
