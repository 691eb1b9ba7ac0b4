//! Downloads a model file next to its target on the NAS (so that installing is one rename),
//! resumably, hashing while it streams, and refuses what must not be installed: a web page or
//! JSON instead of the file, a wrong size, a SHA-256 that does not match, a `.safetensors` whose
//! header does not parse.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::http::{Http, HttpError, strip_query};
use super::remote::Remote;
use crate::source::RESERVED_PREFIX;

/// Attempts (each resumes where the previous one stopped) before a download fails.
const ATTEMPTS: u32 = 5;
/// Space left free on the NAS beyond the download.
const SPACE_MARGIN: u64 = 64 << 20;

/// A verified download, staged next to its target.
#[derive(Debug)]
pub struct Staged {
    /// The staged file.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its SHA-256 (lowercase hex).
    pub sha256: String,
    /// Whether the SHA-256 was checked against the service's or the manifest's (else only the
    /// size and the content checks were).
    pub verified: bool,
    /// Bytes fetched by this call (the rest was there from an earlier attempt).
    pub fetched: u64,
}

/// Why a download failed. `Refused` bodies are deleted: the next attempt starts over.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// What arrived must not be installed.
    #[error("{message}")]
    Refused {
        /// `html`, `json`, `size`, `sha256`, `safetensors`.
        reason: &'static str,
        /// What and why.
        message: String,
    },
    /// A login is needed (a redirect to a login page).
    #[error("{0}")]
    Access(String),
    /// Not enough space on the NAS.
    #[error("not enough space on the NAS: {need} bytes needed, {avail} available")]
    NoSpace {
        /// Bytes needed (with a margin).
        need: u64,
        /// Bytes available.
        avail: u64,
    },
    /// The service failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The NAS failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl DownloadError {
    /// A short reason, for metrics and status.
    pub fn reason(&self) -> &'static str {
        match self {
            DownloadError::Refused { reason, .. } => reason,
            DownloadError::Access(_) => "access",
            DownloadError::NoSpace { .. } => "no_space",
            DownloadError::Http(_) => "http",
            DownloadError::Io(_) => "io",
        }
    }
}

/// What the staged part is of, kept beside it.
#[derive(Serialize, Deserialize, PartialEq, Debug, Default)]
struct PartMeta {
    version: String,
    sha256: Option<String>,
    /// `ETag`, else `Last-Modified`, of the answer that started the part.
    validator: Option<String>,
}

/// The staged file and its description for a target.
pub fn staging_paths(target: &Path) -> (PathBuf, PathBuf) {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (
        dir.join(format!("{RESERVED_PREFIX}part.{name}")),
        dir.join(format!("{RESERVED_PREFIX}part.{name}.json")),
    )
}

fn refused(reason: &'static str, message: String) -> DownloadError {
    DownloadError::Refused { reason, message }
}

/// Refuses bodies that are a web page or JSON (a login page saved as the model, an error
/// answer) from their first bytes: no model format starts with `<`, `{` or `[`.
fn sniff(first: &[u8]) -> Result<(), DownloadError> {
    let lead = first.iter().find(|b| !b.is_ascii_whitespace());
    match lead {
        Some(b'<') => Err(refused(
            "html",
            format!(
                "the server sent a web page, not the file: {:?}",
                String::from_utf8_lossy(&first[..first.len().min(80)])
            ),
        )),
        Some(b'{' | b'[') => Err(refused(
            "json",
            format!(
                "the server sent JSON, not the file: {:?}",
                String::from_utf8_lossy(&first[..first.len().min(120)])
            ),
        )),
        _ => Ok(()),
    }
}

/// Checks a `.safetensors` file: an 8-byte header length, a JSON object of that length, and
/// tensors whose data lies within the file.
pub fn check_safetensors(path: &Path) -> Result<(), String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| "shorter than a safetensors header".to_string())?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 100 << 20 || 8 + n > size {
        return Err(format!(
            "header length {n} does not fit a file of {size} bytes"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let value: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("the header is not JSON: {e}"))?;
    let obj = value.as_object().ok_or("the header is not a JSON object")?;
    let data = size - 8 - n;
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let end = t
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| format!("tensor {name:?} has no data_offsets"))?;
        if end > data {
            return Err(format!(
                "tensor {name:?} ends at {end}, past the {data} bytes of data"
            ));
        }
    }
    Ok(())
}

fn free_space(dir: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn read_meta(path: &Path) -> Option<PartMeta> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn write_meta(path: &Path, meta: &PartMeta) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec(meta).expect("serializable"))?;
    fs::rename(&tmp, path)
}

fn validator_of(r: &ureq::http::Response<ureq::Body>) -> Option<String> {
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    h("etag").or_else(|| h("last-modified"))
}

/// The answer's `Content-Range`.
fn content_range(r: &ureq::http::Response<ureq::Body>) -> Option<(u64, u64, Option<u64>)> {
    super::http::content_range(r.headers().get("content-range")?.to_str().ok()?)
}

/// Hashes the first `len` bytes of `f`.
fn hash_prefix(f: &mut File, len: u64, hasher: &mut Sha256) -> io::Result<()> {
    f.seek(SeekFrom::Start(0))?;
    let mut left = len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the staged part shrank",
            ));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

/// Downloads `remote` for the target at `target` (absolute), staged beside it. `pin` is the
/// manifest's SHA-256. `progress(done, total)` is called as bytes arrive.
pub fn download(
    http: &Http,
    remote: &Remote,
    pin: Option<&str>,
    target: &Path,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Staged, DownloadError> {
    let expected = match (pin, remote.sha256.as_deref()) {
        (Some(p), Some(r)) if p != r => {
            return Err(refused(
                "sha256",
                format!("the manifest pins sha256 {p}, but the service offers {r}: not downloaded"),
            ));
        }
        (Some(p), _) => Some(p.to_string()),
        (None, r) => r.map(str::to_owned),
    };
    let (part_path, meta_path) = staging_paths(target);
    let dir = target.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let wanted = PartMeta {
        version: remote.version.clone(),
        sha256: expected.clone(),
        validator: None,
    };
    let mut meta = match read_meta(&meta_path) {
        Some(m) if m.version == wanted.version && m.sha256 == wanted.sha256 => m,
        _ => {
            // Another version's part, or none: start over.
            let _ = fs::remove_file(&part_path);
            write_meta(&meta_path, &wanted)?;
            wanted
        }
    };
    let mut part = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&part_path)?;
    let mut have = part.metadata()?.len();
    if let Some(size) = remote.size.filter(|_| remote.size_exact) {
        if have > size {
            part.set_len(0)?;
            have = 0;
        }
        let need = size - have + SPACE_MARGIN;
        let avail = free_space(dir)?;
        if avail < need {
            return Err(DownloadError::NoSpace { need, avail });
        }
    }
    let mut fetched = 0u64;
    // Set by each attempt (the prefix of a resume, then what streams in).
    let mut hasher: Sha256;
    let mut attempt = 0;
    let mut last_error: Option<DownloadError> = None;
    let total = loop {
        attempt += 1;
        if attempt > ATTEMPTS {
            return Err(last_error.unwrap_or_else(|| {
                DownloadError::Io(io::Error::other("download attempts exhausted"))
            }));
        }
        let mut headers = Vec::new();
        if have > 0 {
            headers.push(("Range", format!("bytes={have}-")));
            if let Some(v) = &meta.validator {
                headers.push(("If-Range", v.clone()));
            }
        }
        // Each attempt starts from the first URL: signed CDN URLs expire.
        let mut answer = match http.request(&remote.url, &headers) {
            Ok(a) => a,
            Err(e)
                if e.status()
                    .is_some_and(|s| (400..500).contains(&s) && s != 416) =>
            {
                return Err(e.into());
            }
            Err(e) if e.status() == Some(416) => {
                // The range starts at or past the end: start over rather than guess.
                part.set_len(0)?;
                have = 0;
                last_error = Some(e.into());
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "download attempt failed; resuming");
                last_error = Some(e.into());
                continue;
            }
        };
        let final_path = answer
            .url
            .parse::<ureq::http::Uri>()
            .map(|u| u.path().to_string())
            .unwrap_or_default();
        if final_path.starts_with("/login") || final_path.contains("/login/") {
            return Err(DownloadError::Access(format!(
                "the download redirected to a login page ({}): the file requires you to be logged in; set the service's token",
                strip_query(&answer.url)
            )));
        }
        let is_html = answer
            .response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/html"));
        let status = answer.response.status().as_u16();
        let validator = validator_of(&answer.response);
        let (start, total) = match status {
            206 => match content_range(&answer.response) {
                Some((a, _, t)) if a == have => (have, t),
                other => {
                    tracing::warn!(asked = have, got = ?other, "a partial answer that is not the range asked for; starting over");
                    part.set_len(0)?;
                    have = 0;
                    continue;
                }
            },
            200 => {
                if have > 0 {
                    tracing::info!(had = have, "the server sent the whole file: starting over");
                }
                let length = answer
                    .response
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                (0, length)
            }
            other => {
                return Err(DownloadError::Http(HttpError::Status {
                    url: strip_query(&answer.url).to_string(),
                    status: other,
                    body: "unexpected answer to a download".into(),
                }));
            }
        };
        if start > 0
            && meta.validator.is_some()
            && validator.is_some()
            && validator != meta.validator
        {
            // A 206 of another version of the file (a server without If-Range): start over.
            tracing::warn!("the file changed on the server since the part began; starting over");
            part.set_len(0)?;
            have = 0;
            continue;
        }
        if start == 0 {
            part.set_len(0)?;
            have = 0;
            if meta.validator != validator {
                meta.validator = validator;
                write_meta(&meta_path, &meta)?;
            }
        }
        if is_html {
            // A web page (a login page, an error page): never the file.
            let mut start_of = [0u8; 80];
            let n = answer
                .response
                .body_mut()
                .as_reader()
                .read(&mut start_of)
                .unwrap_or(0);
            let verdict = sniff(&start_of[..n]).and_then(|_| sniff(b"<"));
            drop(part);
            if start == 0 {
                let _ = fs::remove_file(&part_path);
                let _ = fs::remove_file(&meta_path);
            }
            return Err(verdict.unwrap_err());
        }
        if let (Some(t), Some(size)) = (total, remote.size.filter(|_| remote.size_exact))
            && t != size
        {
            return Err(refused(
                "size",
                format!("the server offers {t} bytes, the service's listing says {size}"),
            ));
        }
        // The hash covers the whole file: on a resume, the part's prefix (from an earlier
        // attempt or run) is hashed first, then what arrives as it streams.
        hasher = Sha256::new();
        if start > 0 {
            hash_prefix(&mut part, start, &mut hasher)?;
        }
        // Stream: append to the part, hash and count what arrives.
        part.seek(SeekFrom::Start(start))?;
        let mut reader = answer.response.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut first = start == 0;
        let mut failed = None;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if first {
                first = false;
                if let Err(e) = sniff(&buf[..n]) {
                    drop(part);
                    let _ = fs::remove_file(&part_path);
                    let _ = fs::remove_file(&meta_path);
                    return Err(e);
                }
            }
            part.write_all(&buf[..n])?;
            hasher.update(&buf[..n]);
            have += n as u64;
            fetched += n as u64;
            progress(have, total.or(remote.size));
        }
        part.flush()?;
        if let Some(e) = failed {
            tracing::warn!(error = %e, have, attempt, "the download broke off; resuming");
            last_error = Some(DownloadError::Io(e));
            continue;
        }
        if total.is_some_and(|t| have < t) {
            tracing::warn!(have, "the answer ended early; resuming");
            last_error = Some(DownloadError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the answer ended early",
            )));
            continue;
        }
        break total;
    };
    part.sync_all()?;
    let size = part.metadata()?.len();
    let discard = |e: DownloadError| {
        let _ = fs::remove_file(&part_path);
        let _ = fs::remove_file(&meta_path);
        e
    };
    if let Some(want) = remote.size.filter(|_| remote.size_exact).or(total)
        && size != want
    {
        return Err(discard(refused(
            "size",
            format!("{size} bytes arrived, {want} expected"),
        )));
    }
    if !remote.size_exact
        && let Some(approx) = remote.size
        && size.abs_diff(approx) > 1024
    {
        return Err(discard(refused(
            "size",
            format!("{size} bytes arrived, about {approx} expected"),
        )));
    }
    if size != have {
        return Err(discard(DownloadError::Io(io::Error::other(format!(
            "the staged part has {size} bytes, {have} were written: something else writes it"
        )))));
    }
    let sha256 = format!("{:x}", hasher.finalize());
    let mut head = [0u8; 256];
    part.seek(SeekFrom::Start(0))?;
    let n = part.read(&mut head)?;
    if let Err(e) = sniff(&head[..n]) {
        return Err(discard(e));
    }
    if let Some(want) = &expected
        && &sha256 != want
    {
        return Err(discard(refused(
            "sha256",
            format!("sha256 {sha256} arrived, {want} expected"),
        )));
    }
    if target
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
        && let Err(why) = check_safetensors(&part_path)
    {
        return Err(discard(refused(
            "safetensors",
            format!("not a safetensors file: {why}"),
        )));
    }
    Ok(Staged {
        path: part_path,
        size,
        sha256,
        verified: expected.is_some(),
        fetched,
    })
}

/// Removes the description of a staged part once it is installed.
pub fn forget_part(target: &Path) {
    let (_, meta) = staging_paths(target);
    let _ = fs::remove_file(meta);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_pages_and_json_are_refused_from_their_first_bytes() {
        assert_eq!(sniff(b"  <!DOCTYPE html>").unwrap_err().reason(), "html");
        assert_eq!(sniff(b"{\"error\":1}").unwrap_err().reason(), "json");
        assert!(sniff(b"\x80\x00\x00\x00\x00\x00\x00\x00{\"a\"").is_ok());
        assert!(sniff(b"GGUF").is_ok());
        assert!(sniff(b"PK\x03\x04").is_ok());
    }

    #[test]
    fn safetensors_headers_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 8]);
        fs::write(&p, &bytes).unwrap();
        check_safetensors(&p).unwrap();
        fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(check_safetensors(&p).unwrap_err().contains("past the"));
        fs::write(&p, b"\xff\xff\xff\xff\x00\x00\x00\x00{}").unwrap();
        assert!(check_safetensors(&p).is_err());
        fs::write(&p, b"<html>login</html>").unwrap();
        assert!(check_safetensors(&p).is_err());
    }

    #[test]
    fn staging_is_beside_the_target_and_reserved() {
        let (part, meta) = staging_paths(Path::new("/nas/loras/a.safetensors"));
        assert_eq!(part, Path::new("/nas/loras/.arenafs-part.a.safetensors"));
        assert_eq!(
            meta,
            Path::new("/nas/loras/.arenafs-part.a.safetensors.json")
        );
        assert!(crate::source::is_reserved(part.file_name().unwrap()));
    }
}
