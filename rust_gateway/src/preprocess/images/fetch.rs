//! Getting image bytes from a request: `data:` URLs (base64) and http(s) URLs.
//!
//! Fetching is the gateway's SSRF surface, so by default it refuses loopback, private, link-local
//! (cloud metadata), CGNAT, multicast and unspecified addresses. The check runs on the addresses
//! a name *resolves to*, inside the connector's resolver, so it also covers every redirect hop
//! and DNS rebinding between check and connect; literal-IP URLs are checked before each hop.
//! Proxies from the environment are ignored (they would bypass the resolver).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

/// Limits and permissions for fetching.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Allow private/loopback/link-local targets (only for trusted deployments and tests).
    pub allow_private: bool,
    /// Host names or IP literals exempt from the private-address check (e.g. an internal CDN).
    pub allow_hosts: Vec<String>,
    /// Largest encoded image accepted, for URLs and data: URLs alike.
    pub max_bytes: usize,
    /// Whole-request deadline (connect + headers + body).
    pub timeout: Duration,
    pub max_redirects: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            allow_hosts: Vec::new(),
            max_bytes: 20 << 20,
            timeout: Duration::from_secs(10),
            max_redirects: 3,
        }
    }
}

/// Whether an address is one we never fetch from by default.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_forbidden_v4(v4);
            }
            let seg0 = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg0 & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (seg0 & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (seg0 & 0xffc0) == 0xfec0 // site-local (deprecated)
                || v6 == Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0) // NAT64 prefix base
        }
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240 // reserved
}

/// Decode a `data:` URL's payload (base64 only), bounded by `max_bytes`.
pub fn decode_data_url(url: &str, max_bytes: usize) -> Result<Vec<u8>, String> {
    let rest = url.strip_prefix("data:").ok_or("not a data: URL")?;
    let (meta, payload) = rest.split_once(',').ok_or("malformed data: URL (no comma)")?;
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err("data: URL images must be base64-encoded (data:image/png;base64,...)".into());
    }
    // Base64 is 4/3 of the bytes; refuse before decoding anything larger than the limit.
    let payload = payload.trim();
    if payload.len() / 4 * 3 > max_bytes + 3 {
        return Err(format!("image is larger than the limit of {max_bytes} bytes"));
    }
    let cleaned: String;
    let payload = if payload.contains(|c: char| c.is_ascii_whitespace() || c == '%') {
        cleaned = payload.replace("%2B", "+").replace("%2F", "/").replace("%3D", "=").split_whitespace().collect();
        cleaned.as_str()
    } else {
        payload
    };
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(payload)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')));
    let bytes = bytes.map_err(|e| format!("invalid base64 in data: URL: {e}"))?;
    if bytes.len() > max_bytes {
        return Err(format!("image is larger than the limit of {max_bytes} bytes"));
    }
    Ok(bytes)
}

/// Resolver that drops forbidden addresses, so every connection (including redirects) is checked.
struct GuardedResolver {
    allow_private: bool,
    allow_hosts: Arc<Vec<String>>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let exempt = self.allow_private || self.allow_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                addrs.iter().copied().filter(|a| exempt || !is_forbidden_ip(a.ip())).collect();
            if allowed.is_empty() {
                let msg = if addrs.is_empty() {
                    format!("{host} does not resolve")
                } else {
                    format!("{host} resolves to a private, loopback or link-local address, which is not allowed")
                };
                return Err(Box::new(std::io::Error::new(std::io::ErrorKind::PermissionDenied, msg))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            let iter: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(iter)
        })
    }
}

/// Checks a URL's scheme and, for IP literals, its address (names are checked by the resolver).
fn check_url(url: &reqwest::Url, cfg: &FetchConfig) -> Result<(), String> {
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("only http, https and data: image URLs are allowed, not {}:", url.scheme()));
    }
    let host = url.host().ok_or("URL has no host")?;
    let literal = match host {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
        url::Host::Domain(_) => None,
    };
    if let Some(ip) = literal {
        let exempt = cfg.allow_private || cfg.allow_hosts.iter().any(|h| h.trim_matches(['[', ']']) == ip.to_string());
        if !exempt && is_forbidden_ip(ip) {
            return Err(format!("{ip} is a private, loopback or link-local address, which is not allowed"));
        }
    }
    Ok(())
}

/// An http(s) client with the guard, limits and redirect policy of one [`FetchConfig`].
pub struct Fetcher {
    cfg: FetchConfig,
    client: reqwest::Client,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("cfg", &self.cfg).finish()
    }
}

impl Fetcher {
    pub fn new(cfg: FetchConfig) -> Result<Self, String> {
        let policy_cfg = cfg.clone();
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > policy_cfg.max_redirects {
                return attempt.error(format!("more than {} redirects", policy_cfg.max_redirects));
            }
            match check_url(attempt.url(), &policy_cfg) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(format!("redirect refused: {e}")),
            }
        });
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(redirect)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
            .dns_resolver(Arc::new(GuardedResolver {
                allow_private: cfg.allow_private,
                allow_hosts: Arc::new(cfg.allow_hosts.clone()),
            }))
            .user_agent(concat!("m3serve-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        Ok(Self { cfg, client })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    /// Bytes of an image given as a URL (`data:` or http(s)).
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, String> {
        if url.starts_with("data:") {
            return decode_data_url(url, self.cfg.max_bytes);
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid image URL: {e}"))?;
        check_url(&parsed, &self.cfg)?;
        let mut resp = self.client.get(parsed).send().await.map_err(|e| describe(&e))?;
        if !resp.status().is_success() {
            return Err(format!("the server answered HTTP {}", resp.status().as_u16()));
        }
        if let Some(len) = resp.content_length() {
            if len > self.cfg.max_bytes as u64 {
                return Err(format!("image is {len} bytes, more than the limit of {}", self.cfg.max_bytes));
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
            if body.len() + chunk.len() > self.cfg.max_bytes {
                return Err(format!("image is larger than the limit of {} bytes", self.cfg.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// reqwest's top-level message hides the cause (e.g. our resolver's refusal); show the chain.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "172.32.0.1"] {
            assert!(!is_forbidden_ip(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn data_urls() {
        assert_eq!(decode_data_url("data:image/png;base64,aGVsbG8=", 100).unwrap(), b"hello");
        assert_eq!(decode_data_url("data:image/png;base64,aGVsbG8", 100).unwrap(), b"hello");
        assert!(decode_data_url("data:image/png;base64,@@@", 100).unwrap_err().contains("invalid base64"));
        assert!(decode_data_url("data:image/png,hello", 100).unwrap_err().contains("base64"));
        assert!(decode_data_url("data:image/png;base64,aGVsbG8=", 3).unwrap_err().contains("limit"));
    }
}
