//! HTTP for the updater: redirects followed by hand, so that a service's token goes only to the
//! service's own host (never to the CDN it redirects to); rate limits honoured (`Retry-After`,
//! the Hub's `RateLimit`), other failures retried with backoff and jitter, other 4xx never.

use std::time::Duration;

use ureq::http::{Response, Uri};

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 10;
/// Attempts for one request (rate limits, 5xx, transport errors).
const MAX_ATTEMPTS: u32 = 5;
/// Longest wait asked by a rate limit that is honoured; longer ones fail the request.
const MAX_RATE_WAIT: Duration = Duration::from_secs(120);

/// A service with its base URL and, maybe, its token.
#[derive(Clone)]
pub struct Service {
    /// `huggingface` or `civitai`.
    pub name: &'static str,
    /// Base URL, without a trailing slash.
    pub base: String,
    authority: String,
    token: Option<String>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Service {
    /// A service at `base` (`http(s)://host[:port][/prefix]`).
    pub fn new(name: &'static str, base: &str, token: Option<String>) -> Result<Self, String> {
        let base = base.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("{name} endpoint {base:?}: {e}"))?;
        let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
        let authority = match uri.authority() {
            Some(a) if scheme_ok => a.as_str().to_ascii_lowercase(),
            _ => return Err(format!("{name} endpoint {base:?}: expected http(s)://host")),
        };
        Ok(Self {
            name,
            base,
            authority,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// Whether a token is set.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No answer (connection, TLS, timeout), after the retries.
    #[error("{url}: {message}")]
    Transport {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// An answer that is an error (after the retries, for those retried).
    #[error("{url}: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status {
        /// The URL asked (the last hop).
        url: String,
        /// HTTP status.
        status: u16,
        /// The start of the body, for the message.
        body: String,
    },
    /// A redirect loop, or one without a usable `Location`.
    #[error("{0}")]
    Redirect(String),
}

impl HttpError {
    /// The HTTP status, for answers.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An answer and the URL that gave it (after redirects).
pub struct Answer {
    /// The response; its status is 2xx.
    pub response: Response<ureq::Body>,
    /// The URL of the last hop.
    pub url: String,
}

/// The updater's HTTP client.
pub struct Http {
    agent: ureq::Agent,
    services: Vec<Service>,
    /// The base of the backoff (1 s; tests make it shorter).
    backoff: Duration,
}

fn jitter(max_ms: u64) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    Duration::from_millis(h.finish() % max_ms.max(1))
}

/// How long a rate-limited answer asks to wait: `Retry-After` (seconds or an HTTP date), else
/// the `t=` of a `RateLimit` header (the Hub's: `"api";r=0;t=55`).
pub fn rate_wait(response: &Response<ureq::Body>) -> Option<Duration> {
    let header = |n: &str| response.headers().get(n).and_then(|v| v.to_str().ok());
    if let Some(v) = header("retry-after") {
        let v = v.trim();
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Some(when) = httpdate_parse(v) {
            return Some(
                when.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default(),
            );
        }
    }
    let v = header("ratelimit")?;
    v.split(';')
        .filter_map(|p| p.trim().strip_prefix("t="))
        .find_map(|t| t.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn httpdate_parse(s: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts[..] else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = months.iter().position(|m| *m == month)? as i64 + 1;
    let hms: Vec<u64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, se] = hms[..] else { return None };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + (h * 3600 + mi * 60 + se) as i64;
    u64::try_from(secs)
        .ok()
        .map(|s| std::time::UNIX_EPOCH + Duration::from_secs(s))
}

/// `Location` resolved against the URL that answered.
fn join(current: &Uri, location: &str) -> Result<String, String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Ok(location.to_string());
    }
    let scheme = current.scheme_str().unwrap_or("http");
    let authority = current.authority().map(|a| a.as_str()).unwrap_or("");
    if let Some(rest) = location.strip_prefix("//") {
        return Ok(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Ok(format!("{scheme}://{authority}{location}"));
    }
    let path = current.path();
    let dir = &path[..path.rfind('/').map(|i| i + 1).unwrap_or(0)];
    Ok(format!("{scheme}://{authority}{dir}{location}"))
}

fn body_start(response: &mut Response<ureq::Body>) -> String {
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(
        &mut std::io::Read::take(response.body_mut().as_reader(), 512),
        &mut buf,
    );
    String::from_utf8_lossy(&buf)
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .to_string()
}

impl Http {
    /// A client for these services; `read_timeout` bounds each wait for bytes.
    pub fn new(services: Vec<Service>, read_timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .max_redirects_will_error(false)
            .http_status_as_error(false)
            .user_agent(concat!("arenafs/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(read_timeout))
            .timeout_per_read(Some(read_timeout))
            .build();
        Self {
            agent: ureq::Agent::new_with_config(config),
            services,
            backoff: Duration::from_secs(1),
        }
    }

    /// Makes retries wait `base`, 2×`base`, ... (tests).
    pub fn with_backoff(mut self, base: Duration) -> Self {
        self.backoff = base;
        self
    }

    /// The token for `uri`: that of the service whose host it is, else none.
    fn token_for(&self, uri: &Uri) -> Option<&str> {
        let authority = uri.authority()?.as_str().to_ascii_lowercase();
        self.services
            .iter()
            .find(|s| s.authority == authority)
            .and_then(|s| s.token.as_deref())
    }

    fn once(
        &self,
        url: &str,
        headers: &[(&str, String)],
    ) -> Result<Response<ureq::Body>, HttpError> {
        let uri: Uri = url.parse().map_err(|e| HttpError::Transport {
            url: url.to_string(),
            message: format!("bad URL: {e}"),
        })?;
        let token = self.token_for(&uri).map(str::to_owned);
        let transport = |e: ureq::Error| HttpError::Transport {
            url: url.to_string(),
            message: e.to_string(),
        };
        let mut req = self.agent.get(url);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(t) = &token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        req.call().map_err(transport)
    }

    /// One hop with the retry policy: rate limits waited out (up to `MAX_RATE_WAIT`), 5xx and
    /// transport errors retried with backoff and jitter; other answers returned as they are.
    fn hop(
        &self,
        url: &str,
        headers: &[(&str, String)],
    ) -> Result<Response<ureq::Body>, HttpError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let backoff = self.backoff * 2u32.pow(attempt - 1)
                + jitter(self.backoff.as_millis() as u64 / 4 + 1);
            match self.once(url, headers) {
                Ok(mut r) => {
                    let status = r.status().as_u16();
                    let limited = status == 429 || status == 503;
                    if !(limited || (500..600).contains(&status)) || attempt >= MAX_ATTEMPTS {
                        return Ok(r);
                    }
                    let wait = if limited {
                        match rate_wait(&r) {
                            Some(w) if w > MAX_RATE_WAIT => {
                                return Err(HttpError::Status {
                                    url: url.to_string(),
                                    status,
                                    body: format!(
                                        "rate limited for {} s; try again later",
                                        w.as_secs()
                                    ),
                                });
                            }
                            Some(w) => w + jitter(250),
                            None => backoff,
                        }
                    } else {
                        backoff
                    };
                    let why = body_start(&mut r);
                    tracing::info!(
                        url,
                        status,
                        wait_ms = wait.as_millis() as u64,
                        why,
                        "HTTP retry"
                    );
                    std::thread::sleep(wait);
                }
                Err(e) if attempt < MAX_ATTEMPTS => {
                    tracing::info!(url, error = %e, wait_ms = backoff.as_millis() as u64, "HTTP retry");
                    std::thread::sleep(backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// GET `url`, redirects followed (each hop with its own host's token, if any); an error
    /// status is an error.
    pub fn request(&self, url: &str, headers: &[(&str, String)]) -> Result<Answer, HttpError> {
        let mut url = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let mut response = self.hop(&url, headers)?;
            let status = response.status().as_u16();
            if (300..400).contains(&status) && status != 304 {
                let location = response
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        HttpError::Redirect(format!("{url}: HTTP {status} without a Location"))
                    })?;
                let current: Uri = url.parse().map_err(|_| {
                    HttpError::Redirect(format!("{url}: cannot resolve the redirect"))
                })?;
                url = join(&current, location).map_err(HttpError::Redirect)?;
                tracing::debug!(to = %strip_query(&url), "redirect");
                continue;
            }
            if status >= 400 {
                let body = body_start(&mut response);
                return Err(HttpError::Status { url, status, body });
            }
            return Ok(Answer { response, url });
        }
        Err(HttpError::Redirect(format!(
            "{url}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// GET `url` and parse its JSON body (at most 64 MiB).
    pub fn json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, HttpError> {
        let mut answer = self.request(url, &[("Accept", "application/json".into())])?;
        let bytes = answer
            .response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(|e| HttpError::Transport {
                url: answer.url.clone(),
                message: e.to_string(),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| HttpError::Transport {
            url: answer.url.clone(),
            message: format!("not the JSON expected: {e}"),
        })
    }
}

/// `Content-Range: bytes START-END/TOTAL` (`TOTAL` may be `*`: unknown).
pub fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((a.parse().ok()?, b.parse().ok()?, total))
}

/// A URL without its query (signed URLs carry credentials there): for logs.
pub fn strip_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// Percent-encodes one path segment (or a query value).
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a `/`-separated path, keeping the slashes.
pub fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_answering_url() {
        let cur: Uri = "https://hub.example/a/b/c?x=1".parse().unwrap();
        assert_eq!(
            join(&cur, "https://cdn.example/f").unwrap(),
            "https://cdn.example/f"
        );
        assert_eq!(
            join(&cur, "/login?r=1").unwrap(),
            "https://hub.example/login?r=1"
        );
        assert_eq!(join(&cur, "d").unwrap(), "https://hub.example/a/b/d");
        assert_eq!(
            join(&cur, "//cdn.example/x").unwrap(),
            "https://cdn.example/x"
        );
    }

    #[test]
    fn tokens_go_to_their_own_host_only() {
        let http = Http::new(
            vec![
                Service::new("huggingface", "http://127.0.0.1:9/", Some("hf_x".into())).unwrap(),
                Service::new("civitai", "http://LOCALHOST:8", None).unwrap(),
            ],
            Duration::from_secs(1),
        );
        let t = |u: &str| http.token_for(&u.parse().unwrap()).map(str::to_owned);
        assert_eq!(t("http://127.0.0.1:9/api/x").as_deref(), Some("hf_x"));
        assert_eq!(t("http://127.0.0.1:10/api/x"), None, "another port");
        assert_eq!(t("http://localhost:9/cdn"), None, "another host");
        assert_eq!(t("http://localhost:8/api"), None, "no token set");
        assert!(!format!("{:?}", http.services).contains("hf_x"));
        assert!(Service::new("x", "ftp://a", None).is_err());
    }

    #[test]
    fn rate_limits_say_how_long_to_wait() {
        let r = |k: &str, v: &str| {
            ureq::http::Response::builder()
                .status(429)
                .header(k, v)
                .body(ureq::Body::builder().data(""))
                .unwrap()
        };
        assert_eq!(
            rate_wait(&r("Retry-After", "7")),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            rate_wait(&r("RateLimit", "\"api\";r=0;t=55")),
            Some(Duration::from_secs(55))
        );
        let past = rate_wait(&r("Retry-After", "Sun, 06 Nov 1994 08:49:37 GMT"));
        assert_eq!(past, Some(Duration::ZERO));
        assert_eq!(rate_wait(&r("X-Other", "1")), None);
    }

    #[test]
    fn dates_and_encodings() {
        let t = httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
            784_111_777
        );
        assert!(httpdate_parse("yesterday").is_none());
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(encode_path("dir/a b.safetensors"), "dir/a%20b.safetensors");
        assert_eq!(strip_query("https://cdn/x?sig=secret"), "https://cdn/x");
    }
}
