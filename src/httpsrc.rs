//! An HTTP data source for bulk bytes (`ARENA_HTTP_SOURCE`, optionally through a forward proxy
//! `ARENA_HTTP_PROXY`: a Squid tier or a Dragonfly `dfdaemon`), so that a farm's nodes fetch
//! model bytes through a shared cache and the NAS sends each file about once. Docs:
//! docs/farm.md.
//!
//! Only bytes come this way; lookups, listings, identities and writes stay on the NAS mount,
//! which remains the source of truth. A range is accepted only as a `206` whose `Content-Range`
//! is exactly the range asked for and whose total is the NAS file's size, whose
//! `Last-Modified` is the NAS file's mtime (a cache's older copy of the file is refused), with
//! the validator (`ETag`, else `Last-Modified`) that the file's first answer had (and
//! `If-Match` sent with it). Anything else, an error or a timeout, is a fallback: the caller reads the NAS for the
//! rest of that file, and the reason is counted. Requests through a proxy use the absolute
//! form (`GET http://nas/...`), which caching proxies cache; never `CONNECT`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::Serialize;

/// Headers sent with every request unless `ARENA_HTTP_HEADERS` says otherwise: a Dragonfly
/// peer then pulls the whole file behind a ranged miss.
pub const DEFAULT_HEADERS: &str = "X-Dragonfly-Prefetch: true";

/// The HTTP source.
#[derive(Debug)]
pub struct HttpSource {
    /// `host:port` of the server.
    authority: String,
    /// Path prefix under which the NAS root is served (no trailing slash).
    prefix: String,
    /// `host:port` of the forward proxy.
    proxy: Option<String>,
    headers: Vec<(String, String)>,
    timeout: Duration,
    rt: tokio::runtime::Handle,
    url: String,
    proxy_url: Option<String>,
    bytes: AtomicU64,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
}

/// What `status` shows of it.
#[derive(Clone, Debug, Serialize)]
pub struct HttpSourceStatus {
    /// The base URL.
    pub url: String,
    /// The proxy.
    pub proxy: Option<String>,
    /// Bytes fetched over HTTP.
    pub bytes: u64,
    /// Fallbacks to the NAS, by reason.
    pub fallbacks: BTreeMap<&'static str, u64>,
}

fn authority_of(url: &str, what: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{what} {url:?}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!(
            "{what} {url:?}: expected http://host[:port][/prefix]"
        ));
    }
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.trim_end_matches('/').to_string()))
}

/// Parses `Name: value; Name2: value2`.
pub fn parse_headers(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(';')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| format!("header {h:?}: expected Name: value"))?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty()
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                || v.bytes().any(|b| b < 0x20 && b != b'\t')
            {
                return Err(format!("header {h:?}: not a valid header"));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// `Content-Range: bytes START-END/TOTAL`, with a known total.
fn content_range(v: &str) -> Option<(u64, u64, u64)> {
    let (a, b, total) = crate::update::http::content_range(v)?;
    Some((a, b, total?))
}

impl HttpSource {
    /// Checks a URL of the source or the proxy (`http://host[:port][/prefix]`); returns it
    /// without a trailing slash.
    pub fn check_url(url: &str, what: &str) -> Result<String, String> {
        authority_of(url, what)?;
        Ok(url.trim_end_matches('/').to_string())
    }

    /// A source at `url` (`http://host[:port][/prefix]`), maybe through `proxy`
    /// (`http://host:port`), with `headers`; each request is bounded by `timeout`.
    pub fn new(
        url: &str,
        proxy: Option<&str>,
        headers: Vec<(String, String)>,
        timeout: Duration,
        rt: tokio::runtime::Handle,
    ) -> Result<HttpSource, String> {
        let (authority, prefix) = authority_of(url, "ARENA_HTTP_SOURCE")?;
        let proxy_authority = proxy
            .map(|p| authority_of(p, "ARENA_HTTP_PROXY").map(|(a, _)| a))
            .transpose()?;
        Ok(HttpSource {
            authority,
            prefix,
            proxy: proxy_authority,
            headers,
            timeout,
            rt,
            url: url.trim_end_matches('/').to_string(),
            proxy_url: proxy.map(str::to_owned),
            bytes: AtomicU64::new(0),
            fallbacks: Mutex::new(BTreeMap::new()),
        })
    }

    /// Counts a fallback to the NAS for `rel`.
    pub fn fallback(&self, rel: &Path, reason: &'static str) {
        *self.fallbacks.lock().entry(reason).or_default() += 1;
        tracing::warn!(path = %rel.display(), reason, "HTTP source: reading the NAS directly for this file");
    }

    /// What `status` shows.
    pub fn status(&self) -> HttpSourceStatus {
        HttpSourceStatus {
            url: self.url.clone(),
            proxy: self.proxy_url.clone(),
            bytes: self.bytes.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.lock().clone(),
        }
    }

    /// Bytes `[start, end)` of NAS-relative `rel`, whose NAS size is `size` and mtime
    /// `mtime_secs`. `validator` is the file's pinned validator: `None` before the first answer,
    /// which pins it. An error is the reason to fall back.
    pub fn fetch(
        &self,
        rel: &Path,
        start: u64,
        end: u64,
        (size, mtime_secs): (u64, i64),
        validator: &mut Option<String>,
    ) -> Result<Vec<u8>, &'static str> {
        let path = format!(
            "{}/{}",
            self.prefix,
            crate::update::http::encode_path(&rel.to_string_lossy())
        );
        let (connect, target) = match &self.proxy {
            Some(p) => (p.clone(), format!("http://{}{path}", self.authority)),
            None => (self.authority.clone(), path),
        };
        let mut req = hyper::Request::builder()
            .method("GET")
            .uri(&target)
            .header("Host", &self.authority)
            .header("Range", format!("bytes={start}-{}", end - 1))
            .header("User-Agent", concat!("arenafs/", env!("CARGO_PKG_VERSION")));
        if let Some(v) = validator.as_deref() {
            req = req.header("If-Match", v);
        }
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|_| "bad_request")?;
        let want = end - start;
        let fut = async move {
            let stream = tokio::net::TcpStream::connect(&connect)
                .await
                .map_err(|_| "connect")?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|_| "connect")?;
            let driver = tokio::spawn(conn);
            let res = sender.send_request(req).await.map_err(|_| "transport");
            let out = match res {
                Err(e) => Err(e),
                Ok(res) => {
                    let status = res.status().as_u16();
                    let header = |n: &str| {
                        res.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    let range = header("content-range");
                    let modified = header("last-modified");
                    let got = header("etag").or_else(|| modified.clone());
                    let body = Limited::new(res.into_body(), want as usize + 1)
                        .collect()
                        .await
                        .map(|b| b.to_bytes());
                    Ok((status, range, got, modified, body))
                }
            };
            driver.abort();
            out
        };
        let (status, range, got, modified, body) = self
            .rt
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
            .map_err(|_| "timeout")??;
        match status {
            206 => {}
            200 => return Err("not_partial"),
            412 => return Err("validator_changed"),
            _ => return Err("status"),
        }
        match range.as_deref().and_then(content_range) {
            Some((a, b, total)) if a == start && b == end - 1 && total == size => {}
            Some((_, _, total)) if total != size => return Err("size_mismatch"),
            _ => return Err("bad_range"),
        }
        // The bytes must be of the NAS file's version, not of one a cache kept: its
        // Last-Modified is the NAS file's mtime (files modified less than
        // ARENA_CACHE_STABLE_SECS ago are not copied, so a second's resolution tells versions
        // apart).
        let served = modified
            .as_deref()
            .and_then(crate::update::http::httpdate_parse)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64);
        match served {
            None => return Err("no_last_modified"),
            Some(t) if t != mtime_secs => return Err("stale"),
            Some(_) => {}
        }
        match (validator.as_deref(), got) {
            (Some(pinned), Some(g)) if pinned != g => return Err("validator_changed"),
            (None, g) => *validator = g,
            _ => {}
        }
        let body = body.map_err(|_| "short_body")?;
        if body.len() as u64 != want {
            return Err("short_body");
        }
        self.bytes.fetch_add(want, Ordering::Relaxed);
        Ok(body.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_headers_and_ranges_parse() {
        assert_eq!(
            authority_of("http://nas:8080/models/", "x").unwrap(),
            ("nas:8080".into(), "/models".into())
        );
        assert_eq!(
            authority_of("http://nas", "x").unwrap(),
            ("nas:80".into(), "".into())
        );
        assert!(authority_of("https://nas", "x").is_err());
        assert!(authority_of("http://u:p@nas", "x").is_err());
        assert_eq!(
            parse_headers("X-Dragonfly-Prefetch: true; X-A: b c").unwrap(),
            vec![
                ("X-Dragonfly-Prefetch".into(), "true".into()),
                ("X-A".into(), "b c".into())
            ]
        );
        assert!(parse_headers("nocolon").is_err());
        assert!(parse_headers("Bad Name: x").is_err());
        assert_eq!(content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(content_range("bytes 0-99/*"), None);
    }
}
