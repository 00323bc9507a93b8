//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.
//!
//! Every failure a client can see goes through [`ApiError`], so the status code and the JSON shape
//! are decided in one place (agent frameworks retry on 429/5xx and must not retry on 4xx).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: invalid_request_error, authentication_error, not_found_error, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    /// Seconds for a `Retry-After` header (overload answers are retry-safe).
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// 400: the request is malformed or a field is invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the offending field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message).with_code("invalid_api_key")
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    pub fn model_not_found(model: &str, served: &str) -> Self {
        Self::not_found(format!("The model `{model}` does not exist. This gateway serves `{served}`."))
            .with_param("model")
            .with_code("model_not_found")
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body is larger than the limit of {limit} bytes."),
        )
        .with_code("request_too_large")
    }

    /// 429: every worker is at its concurrency limit; the client may retry shortly.
    pub fn overloaded(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message).with_code("overloaded");
        e.retry_after = Some(1);
        e
    }

    /// 503: no worker can take the request at all (none healthy, or all circuit breakers open).
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable_error", message)
            .with_code("no_healthy_worker");
        e.retry_after = Some(2);
        e
    }

    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message).with_code("upstream_error")
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message).with_code("upstream_timeout")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    /// The error object as it appears in a body or inside a streamed `data:` event.
    pub fn to_json(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// This error's status and headers with `body` (another API's error shape) as the JSON body.
    pub fn response_with_body(&self, body: &serde_json::Value) -> Response {
        let mut resp = (self.status, serde_json::to_vec(body).unwrap_or_default()).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.response_with_body(&self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_openai_shape() {
        let e = ApiError::invalid_param("temperature", "temperature must be in [0, 2], got 5");
        let v = e.to_json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "temperature");
        assert!(v["error"]["code"].is_null());
        assert!(v["error"]["message"].as_str().unwrap().contains("got 5"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn statuses_match_their_meaning() {
        assert_eq!(ApiError::unauthorized("x").status, StatusCode::UNAUTHORIZED);
        assert_eq!(ApiError::model_not_found("a", "b").status, StatusCode::NOT_FOUND);
        assert_eq!(ApiError::body_too_large(10).status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(ApiError::overloaded("x").status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ApiError::unavailable("x").status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ApiError::timeout("x").status, StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn overload_answers_carry_retry_after() {
        let resp = ApiError::overloaded("busy").into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let resp = ApiError::invalid("bad").into_response();
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
    }
}
