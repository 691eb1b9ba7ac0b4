//! A minimal client for the control socket, used by the CLI and the tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// `GET path` over the unix socket; returns the body of a 2xx answer.
pub fn get(socket: &Path, path: &str) -> Result<String> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "no arenafs daemon answers at {} (is the file system mounted?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: arenafs\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed answer")?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("{path}: HTTP {status}: {body}");
    }
    Ok(body.to_string())
}
