//! The control commands of the CLI (`status`, `stats`, `prefetch`, `resolve`, `trim`,
//! `reload`): finding a daemon's socket, parsing sizes and durations, and printing answers for
//! people.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::Value;

use crate::control::default_socket;
use crate::mount::{absolute, parse_mountinfo};

/// The socket of the daemon to talk to: `--socket`, else the default socket of the mount point,
/// else that of the only arenafs mount of this machine.
pub fn find_socket(mountpoint: Option<&Path>, socket: Option<&Path>) -> Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    let mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.fstype == "fuse.arenafs")
        .map(|m| m.target)
        .collect();
    let mp = match mountpoint {
        Some(mp) => absolute(mp)?,
        None => match mounts.as_slice() {
            [one] => one.clone(),
            [] => bail!("no arenafs mount on this machine; give a mount point or --socket"),
            many => bail!(
                "several arenafs mounts ({}); give one with --mountpoint",
                many.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    let sock = default_socket(&mp);
    if !sock.exists() {
        if mounts.contains(&mp) {
            bail!(
                "{} is an arenafs mount but {} does not exist; it was mounted with another socket: give --socket",
                mp.display(),
                sock.display()
            );
        }
        bail!(
            "no arenafs daemon is running for {} (not an arenafs mount, and no socket at {})",
            mp.display(),
            sock.display()
        );
    }
    Ok(sock)
}

/// Parses a size: bytes, or a number with `K`, `M`, `G`, `T` (powers of 1000, like
/// `ARENA_CACHE_MAX_GB`) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024); a trailing `B` is
/// optional.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 50G, 800MiB, 1000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => {
            return Err(format!(
                "'{s}': unknown unit '{unit}' (K, M, G, T, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let v = n * mult;
    if !v.is_finite() || v >= u64::MAX as f64 {
        return Err(format!("'{s}' is too large"));
    }
    Ok(v as u64)
}

/// Parses a duration: seconds, or a number with `s`, `m`, `h`, `d` or `w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 90s, 30m, 12h, 7d, 2w)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("'{s}': unknown unit '{unit}' (s, m, h, d, w)")),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{s}' is too long"))
}

/// `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// One line per copy: `running  loras/x.safetensors  40% 1.2 GiB/3.0 GiB  110 MB/s  eta 16s`.
pub fn job_line(j: &Value) -> String {
    let total = u(&j["total_bytes"]);
    let done = u(&j["done_bytes"]);
    if s(&j["state"]) != "running" {
        return format!("queued   {} ({})", s(&j["path"]), s(&j["reason"]));
    }
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    let mut line = format!(
        "running  {}  {pct}% {}/{}",
        s(&j["path"]),
        human_bytes(done),
        human_bytes(total)
    );
    if let Some(rate) = j["rate_bytes_per_sec"].as_f64()
        && rate > 0.0
    {
        let _ = write!(line, "  {}/s", human_bytes(rate as u64));
    }
    if let Some(eta) = j["eta_secs"].as_f64() {
        let _ = write!(line, "  eta {:.0}s", eta);
    }
    line
}

/// The human summary of `GET /arena/status`.
pub fn format_status(st: &Value) -> String {
    let mut o = String::new();
    let state = s(&st["cache_state"]);
    let meaning = match state {
        "red" => "serving and making copies",
        "green" => "serving existing copies, making none",
        "gray" => "caching off: everything from the NAS",
        _ => "",
    };
    let _ = writeln!(o, "mount        {}", s(&st["mountpoint"]));
    let _ = writeln!(
        o,
        "NAS          {}{}",
        s(&st["nas_dir"]),
        if st["offline"].as_bool() == Some(true) {
            "  (OFFLINE: not answering)"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "cache        {}", s(&st["cache_dir"]));
    let _ = writeln!(o, "state        {state} ({meaning})");
    let _ = writeln!(
        o,
        "modes        discovery {}, prefetch {}, concurrency {}",
        s(&st["discovery_mode"]),
        s(&st["prefetch_strategy"]),
        u(&st["max_concurrency"])
    );
    let _ = writeln!(
        o,
        "used         {} of {} ({} copies, {} complete)",
        human_bytes(u(&st["cache_used_bytes"])),
        human_bytes(u(&st["cache_limit_bytes"])),
        u(&st["cache_entries"]),
        u(&st["cache_complete_entries"])
    );
    let budget = u(&st["session_byte_budget"]);
    let _ = writeln!(
        o,
        "downloaded   {} by background copies{}",
        human_bytes(u(&st["session_bytes_downloaded"])),
        if budget > 0 {
            format!(" (budget {})", human_bytes(budget))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        o,
        "passthrough  {}",
        if st["passthrough_available"].as_bool() == Some(true) {
            "yes"
        } else {
            "no (complete copies are served in user space)"
        }
    );
    let set_line = |o: &mut String, label: &str, ap: &Value| {
        let _ = writeln!(
            o,
            "{label} {}: {} models, {} complete, {} copying, {} not found",
            s(&ap["state"]),
            u(&ap["required_models"]),
            u(&ap["complete"]),
            u(&ap["copying"]),
            ap["not_found"].as_array().map_or(0, Vec::len)
        );
    };
    set_line(&mut o, "required set", &st["autopatch_status"]);
    if let Some(clients) = st["clients"].as_object() {
        for (id, ap) in clients {
            set_line(&mut o, &format!("  client {id}"), ap);
        }
    }
    if st["http_source"].is_object() {
        let h = &st["http_source"];
        let http = u(&h["bytes"]);
        let direct = u(&st["stats"]["bytes_fetched"]).saturating_sub(http);
        let via = h["proxy"]
            .as_str()
            .map(|p| format!(" via {p}"))
            .unwrap_or_default();
        let fallbacks: Vec<String> = h["fallbacks"]
            .as_object()
            .map(|f| f.iter().map(|(k, v)| format!("{k} {v}")).collect())
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "http source  {}{via}: {} over HTTP, {} from the NAS directly; fallbacks: {}",
            s(&h["url"]),
            human_bytes(http),
            human_bytes(direct),
            if fallbacks.is_empty() {
                "none".into()
            } else {
                fallbacks.join(", ")
            }
        );
    }
    if st["update"].is_object() {
        let _ = writeln!(o, "updates      {}", update_summary(&st["update"]));
        update_models(&mut o, &st["update"]);
    }
    let stats = &st["stats"];
    let hits = u(&stats["opens_passthrough"]) + u(&stats["opens_ssd"]);
    let _ = writeln!(
        o,
        "opens        {hits} hits, {} misses, {} not cached by policy",
        u(&stats["opens_filling"]),
        u(&stats["opens_nas"])
    );
    let jobs = st["jobs"].as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        let _ = writeln!(o, "copies       none running or queued");
    } else {
        let _ = writeln!(
            o,
            "copies       {} running, {} queued",
            jobs.iter().filter(|j| j["state"] == "running").count(),
            u(&st["queue_length"])
        );
        for j in &jobs {
            let _ = writeln!(o, "  {}", job_line(j));
        }
    }
    o
}

/// The human form of `GET /arena/stats`.
pub fn format_stats(st: &Value) -> String {
    let mut o = String::new();
    let row = |o: &mut String, name: &str, now: &Value, total: &Value, bytes: bool| {
        let f = |v: &Value| {
            if bytes {
                human_bytes(u(v))
            } else {
                u(v).to_string()
            }
        };
        let _ = writeln!(o, "{name:28} {:>14} {:>14}", f(now), f(total));
    };
    let _ = writeln!(o, "{:28} {:>14} {:>14}", "", "since start", "all runs");
    let totals = &st["totals"]["overall"];
    for (key, bytes) in [
        ("opens_passthrough", false),
        ("opens_ssd", false),
        ("opens_filling", false),
        ("opens_nas", false),
        ("bytes_from_ssd", true),
        ("bytes_from_nas", true),
        ("bytes_fetched", true),
        ("session_bytes_downloaded", true),
        ("copies_completed", false),
        ("copies_failed", false),
        ("copy_retries", false),
        ("evictions", false),
        ("stale_dropped", false),
        ("copies_no_space", false),
        ("read_errors", false),
    ] {
        row(&mut o, key, &st[key], &totals[key], bytes);
    }
    if let Some(cats) = st["totals"]["categories"].as_object()
        && !cats.is_empty()
    {
        let _ = writeln!(
            o,
            "\n{:20} {:>8} {:>8} {:>12} {:>8} {:>9}   (all runs)",
            "category", "hits", "misses", "fetched", "copies", "evictions"
        );
        for (name, c) in cats {
            let _ = writeln!(
                o,
                "{name:20} {:>8} {:>8} {:>12} {:>8} {:>9}",
                u(&c["hits"]),
                u(&c["misses"]),
                human_bytes(u(&c["bytes_fetched"])),
                u(&c["copies_completed"]),
                u(&c["evictions"])
            );
        }
    }
    o
}

/// The per-model table of a resolve, prefetch or autopatch answer.
pub fn format_models(answer: &Value) -> String {
    let mut o = String::new();
    for m in answer["models"].as_array().into_iter().flatten() {
        let name = format!("{}/{}", s(&m["category"]), s(&m["filename"]));
        if m["status"] == "not_found" {
            let _ = writeln!(o, "{name}: not found on the NAS");
            continue;
        }
        let _ = writeln!(
            o,
            "{name}: {} ({}), cached {} ({}), {}",
            s(&m["path"]),
            human_bytes(u(&m["size"])),
            s(&m["cached"]),
            human_bytes(u(&m["cached_bytes"])),
            match s(&m["reason"]) {
                "queued" => "would copy / queued".to_string(),
                "already_queued" => "already being copied".to_string(),
                "complete" => "nothing to copy".to_string(),
                r => format!("not copied: {}", r.replace('_', " ")),
            }
        );
    }
    if let Some(t) = answer.get("totals") {
        let _ = writeln!(
            o,
            "total: {} models, {} found, {} not found; {} on the NAS, {} cached, {} to fetch{}{}",
            u(&t["models"]),
            u(&t["found"]),
            u(&t["not_found"]),
            human_bytes(u(&t["size_bytes"])),
            human_bytes(u(&t["cached_bytes"])),
            human_bytes(u(&t["to_fetch_bytes"])),
            match t["budget_remaining"].as_u64() {
                Some(b) => format!("; budget left {}", human_bytes(b)),
                None => String::new(),
            },
            if t["within_budget"] == false {
                " (EXCEEDS THE BUDGET)"
            } else {
                ""
            }
        );
    }
    o
}

/// The human form of a workflow resolution (`resolve --workflow`, `prefetch --workflow`).
pub fn format_workflow(r: &Value) -> String {
    let mut o = String::new();
    let models = r["models"].as_array().cloned().unwrap_or_default();
    for m in &models {
        let status = s(&m["status"]);
        let nodes = m["nodes"]
            .as_array()
            .map(|n| {
                n.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let nodes = if nodes.is_empty() {
            String::new()
        } else {
            format!("  [node {nodes}]")
        };
        if status == "unresolved" {
            let _ = writeln!(
                o,
                "{status:15} {}{nodes}: {}",
                m["category"].as_str().unwrap_or("?"),
                s(&m["reason"])
            );
            continue;
        }
        let name = format!(
            "{}/{}",
            m["category"].as_str().unwrap_or("?"),
            m["path"].as_str().or(m["filename"].as_str()).unwrap_or("?")
        );
        let mut line = format!("{status:15} {name}{nodes}");
        match m["on_nas"].as_bool() {
            Some(true) => {
                let _ = write!(line, "  on NAS: {}", s(&m["nas_path"]));
                if let Some(size) = m["size"].as_u64() {
                    let _ = write!(line, " ({})", human_bytes(size));
                }
            }
            Some(false) => line.push_str("  NOT ON THE NAS"),
            None => {}
        }
        if let Some(c) = m["cache"].as_str() {
            let _ = write!(line, ", cached {c}");
        }
        match (m["copy"].as_bool(), m["why"].as_str()) {
            (Some(true), _) => line.push_str(", would copy"),
            (Some(false), Some("not_exec")) | (None, _) => {}
            (Some(false), Some(why)) => {
                let _ = write!(line, ", no copy: {}", why.replace('_', " "));
            }
            (Some(false), None) => {}
        }
        if let Some(url) = m["url"].as_str() {
            let _ = write!(line, "  <{url}>");
        }
        let _ = writeln!(o, "{line}");
    }
    let t = &r["totals"];
    let _ = write!(
        o,
        "total: {} exec, {} mentioned only, {} declared, {} unresolved",
        u(&t["exec"]),
        u(&t["mentioned_only"]),
        u(&t["declared"]),
        u(&t["unresolved"])
    );
    if let Some(bytes) = t["bytes_on_nas"].as_u64() {
        let _ = write!(o, "; exec files on the NAS {}", human_bytes(bytes));
    }
    if let Some(c) = t["bytes_cached"].as_u64() {
        let _ = write!(o, ", cached {}", human_bytes(c));
    }
    if let Some(c) = t["bytes_to_copy"].as_u64() {
        let _ = write!(o, ", to copy {}", human_bytes(c));
    }
    if let Some(b) = t["budget_remaining"].as_u64() {
        let _ = write!(o, " (budget left {})", human_bytes(b));
    }
    o.push('\n');
    if t["missing"].is_null() {
        o.push_str("(not looked up on a NAS: give --nas DIR or a mount point)\n");
    }
    let missing: Vec<String> = models
        .iter()
        .filter(|m| m["status"] == "exec" && m["on_nas"] == false)
        .map(|m| {
            format!(
                "{}/{}",
                m["category"].as_str().unwrap_or("?"),
                m["path"].as_str().unwrap_or("?")
            )
        })
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(o, "missing on the NAS: {}", missing.join(", "));
    }
    if let Some(n) = r["queued"].as_u64() {
        let _ = writeln!(
            o,
            "queued {n} copies ({})",
            human_bytes(u(&r["bytes_to_fetch"]))
        );
    }
    for w in r["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(o, "warning: {}", s(w));
    }
    o
}

/// One line on the updater: what runs, what is available, the window.
fn update_summary(up: &Value) -> String {
    let window = match up["window"].as_str() {
        Some(w) => format!(
            "window {w} ({})",
            if up["window_open"] == true {
                "open"
            } else {
                "closed"
            }
        ),
        None => "no window: on demand only".into(),
    };
    let running = if up["running"].is_object() {
        format!("{} running", s(&up["running"]["kind"]))
    } else {
        "idle".into()
    };
    let available: Vec<&str> = up["available"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "{running}; {}; {window}; {} downloaded",
        if available.is_empty() {
            "no update known to be available".to_string()
        } else {
            format!("available: {}", available.join(", "))
        },
        human_bytes(u(&up["downloaded_bytes"]))
    )
}

/// A line per model of the running update run, with its download's progress.
fn update_models(o: &mut String, up: &Value) {
    for m in up["running"]["models"].as_array().into_iter().flatten() {
        let total = m["total_bytes"].as_u64();
        let pct = total
            .filter(|t| *t > 0)
            .map(|t| format!(" ({}%)", u(&m["done_bytes"]) * 100 / t))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  {} {} {}{}{pct}",
            s(&m["id"]),
            s(&m["state"]),
            human_bytes(u(&m["done_bytes"])),
            total
                .map(|t| format!(" of {}", human_bytes(t)))
                .unwrap_or_default()
        );
    }
}

/// `arenafs update status -m MOUNTPOINT` (the daemon's `/arena/update/status`).
pub fn format_update(up: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "manifest     {}", s(&up["manifest"]));
    let _ = writeln!(o, "updates      {}", update_summary(up));
    update_models(&mut o, up);
    if up["last"].is_object() {
        let _ = writeln!(
            o,
            "last run     {}{} (run {})",
            s(&up["last"]["kind"]),
            if up["last"]["scheduled"] == true {
                ", scheduled"
            } else {
                ""
            },
            u(&up["last"]["run"])
        );
        for r in up["last"]["outcomes"].as_array().into_iter().flatten() {
            let why = r["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            let _ = writeln!(o, "  {} {}{why}", s(&r["id"]), s(&r["action"]));
        }
    }
    if let Some(f) = up["failures"].as_object().filter(|f| !f.is_empty()) {
        let list: Vec<String> = f.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(o, "failures     {}", list.join(", "));
    }
    o
}

/// The human form of a trim answer.
pub fn format_trim(r: &Value) -> String {
    let mut o = String::new();
    let verb = if r["dry_run"] == true {
        "would remove"
    } else {
        "removed"
    };
    for i in r["removed"].as_array().into_iter().flatten() {
        let _ = writeln!(
            o,
            "{verb} {} ({})",
            s(&i["path"]),
            human_bytes(u(&i["bytes"]))
        );
    }
    let _ = writeln!(
        o,
        "{verb} {} copies, {}; kept {} busy and {} pinned",
        r["removed"].as_array().map_or(0, Vec::len),
        human_bytes(u(&r["freed_bytes"])),
        u(&r["skipped_busy"]),
        u(&r["skipped_pinned"])
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("50G").unwrap(), 50_000_000_000);
        assert_eq!(parse_size("50GB").unwrap(), 50_000_000_000);
        assert_eq!(parse_size("1.5MiB").unwrap(), 1_572_864);
        assert_eq!(parse_size(" 2 gib ").unwrap(), 2 << 30);
        for bad in ["", "G", "-1G", "5X", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        for bad in ["", "d", "1.5h", "3y", "99999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn job_lines() {
        let j = serde_json::json!({"path":"loras/a.safetensors","state":"running","reason":"loaded",
            "total_bytes":200,"done_bytes":50,"rate_bytes_per_sec":10.0,"eta_secs":15.0});
        assert_eq!(
            job_line(&j),
            "running  loras/a.safetensors  25% 50 B/200 B  10 B/s  eta 15s"
        );
        let q = serde_json::json!({"path":"vae/v.pt","state":"queued","reason":"prefetch"});
        assert_eq!(job_line(&q), "queued   vae/v.pt (prefetch)");
    }
}
