//! The one error type of preprocessing: client mistakes (4xx, with a message that names the
//! problem) versus our own failures (5xx).

use thiserror::Error;

/// Why a request could not be turned into a prompt. [`PreprocessError::status`] gives the HTTP code.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PreprocessError {
    /// Malformed or unsupported request content (400). `param` names the offending field if known.
    #[error("{message}")]
    BadRequest { message: String, param: Option<String> },
    /// An image could not be used (400): bad base64, truncated data, unsupported format, too large,
    /// a URL we refuse to fetch, etc.
    #[error("image {index}: {message}")]
    Image { index: usize, message: String },
    /// An image URL could not be fetched in time or its server failed (400: the client gave it).
    #[error("image {index}: could not fetch {url}: {message}")]
    Fetch { index: usize, url: String, message: String },
    /// The rendered prompt is longer than the model accepts (400).
    #[error("the prompt has {tokens} tokens, more than the limit of {limit}")]
    PromptTooLong { tokens: usize, limit: usize },
    /// A fault of the gateway or the checkpoint files (500).
    #[error("internal preprocessing error: {0}")]
    Internal(String),
}

impl PreprocessError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: None }
    }

    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), param: Some(param.to_string()) }
    }

    pub fn image(index: usize, message: impl Into<String>) -> Self {
        Self::Image { index, message: message.into() }
    }

    /// HTTP status code the server should answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Internal(_) => 500,
            _ => 400,
        }
    }

    /// OpenAI error `type` field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Internal(_) => "internal_error",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI error `param` field.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::BadRequest { param, .. } => param.as_deref(),
            Self::Image { .. } | Self::Fetch { .. } => Some("messages"),
            Self::PromptTooLong { .. } => Some("messages"),
            Self::Internal(_) => None,
        }
    }
}
