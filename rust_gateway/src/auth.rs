//! API keys: data-plane Bearer keys and the admin key, compared in constant time.

use crate::error::ApiError;
use axum::http::HeaderMap;

/// Constant-time equality, so response timing does not leak how much of a key matched.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Check the data-plane key; no configured keys means the API is open.
pub fn check_api_key(keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    check_token(keys, bearer(headers), "Missing API key: send `Authorization: Bearer <key>`.")
}

/// The data-plane key as Anthropic clients send it (`x-api-key`), or as a Bearer token (what
/// `ANTHROPIC_AUTH_TOKEN` makes Claude Code send).
pub fn check_anthropic_key(keys: &[String], headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim).or_else(|| bearer(headers));
    check_token(keys, given, "Missing API key: send `x-api-key: <key>` or `Authorization: Bearer <key>`.")
}

fn check_token(keys: &[String], token: Option<&str>, missing: &str) -> Result<(), ApiError> {
    if keys.is_empty() {
        return Ok(());
    }
    let Some(token) = token else {
        return Err(ApiError::unauthorized(missing));
    };
    // Compare with every key (no early exit) to keep timing independent of which key matched.
    let ok = keys.iter().fold(false, |acc, k| acc | ct_eq(k.as_bytes(), token.as_bytes()));
    if ok {
        Ok(())
    } else {
        Err(ApiError::unauthorized("Incorrect API key provided."))
    }
}

/// Check the admin key (Bearer or `x-admin-key`); the admin API is off without one.
pub fn check_admin_key(admin_key: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = admin_key else {
        return Err(ApiError::forbidden("The admin API is disabled: start the gateway with --admin-key."));
    };
    let given = headers.get("x-admin-key").and_then(|v| v.to_str().ok()).or_else(|| bearer(headers));
    match given {
        Some(g) if ct_eq(expected.as_bytes(), g.as_bytes()) => Ok(()),
        _ => Err(ApiError::unauthorized("Missing or incorrect admin key.")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(auth: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("authorization", HeaderValue::from_str(auth).unwrap());
        m
    }

    #[test]
    fn api_keys() {
        let keys = vec!["k1".to_string(), "k2".to_string()];
        assert!(check_api_key(&[], &HeaderMap::new()).is_ok());
        assert!(check_api_key(&keys, &h("Bearer k2")).is_ok());
        assert!(check_api_key(&keys, &h("bearer k1")).is_ok());
        assert_eq!(check_api_key(&keys, &h("Bearer nope")).unwrap_err().status.as_u16(), 401);
        assert_eq!(check_api_key(&keys, &HeaderMap::new()).unwrap_err().status.as_u16(), 401);
        assert!(check_api_key(&keys, &h("Basic k1")).is_err());
    }

    #[test]
    fn anthropic_keys_come_as_x_api_key_or_bearer() {
        let keys = vec!["k1".to_string()];
        let mut m = HeaderMap::new();
        m.insert("x-api-key", HeaderValue::from_static("k1"));
        assert!(check_anthropic_key(&keys, &m).is_ok());
        assert!(check_api_key(&keys, &m).is_err(), "the OpenAI routes keep Bearer only");
        m.insert("x-api-key", HeaderValue::from_static("nope"));
        assert_eq!(check_anthropic_key(&keys, &m).unwrap_err().status.as_u16(), 401);
        assert!(check_anthropic_key(&keys, &h("Bearer k1")).is_ok());
        let e = check_anthropic_key(&keys, &HeaderMap::new()).unwrap_err();
        assert!(e.message.contains("x-api-key"), "{}", e.message);
        assert!(check_anthropic_key(&[], &HeaderMap::new()).is_ok());
    }

    #[test]
    fn admin_key() {
        assert_eq!(check_admin_key(None, &h("Bearer x")).unwrap_err().status.as_u16(), 403);
        assert!(check_admin_key(Some("adm"), &h("Bearer adm")).is_ok());
        let mut m = HeaderMap::new();
        m.insert("x-admin-key", HeaderValue::from_static("adm"));
        assert!(check_admin_key(Some("adm"), &m).is_ok());
        assert_eq!(check_admin_key(Some("adm"), &h("Bearer k")).unwrap_err().status.as_u16(), 401);
    }
}
