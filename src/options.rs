//! Mount options: `-o` strings (as `mount.fuse3` and fstab pass them).
//!
//! An option is either a mount-level option handled here (FUSE and kernel flags, the socket, the
//! env file) or a setting (any key of [`crate::config::KEYS`] by its `-o` name), which is passed on
//! to the configuration loader. Anything else is refused with a message, never ignored.

use std::path::PathBuf;
use std::time::Duration;

use nix::mount::MsFlags;

use crate::config;

/// How long the kernel may cache attributes and entries by default: long enough that a warm walk
/// of a large model library (100,000 files take seconds) is served from the kernel's caches,
/// short enough that a change another machine makes on the NAS shows within a few seconds.
/// Contents never depend on it (every open checks the NAS file's identity), listings are
/// refetched as soon as a directory's mtime changes, and an open that finds the NAS file
/// changed drops the kernel's attributes at once.
pub const DEFAULT_ATTR_TTL: Duration = Duration::from_secs(10);

/// Mount-level options (everything that is not a cache setting).
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// `allow_other` (default on).
    pub allow_other: bool,
    /// `default_permissions` (default on).
    pub default_permissions: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// Extra mount flags.
    pub flags: MsFlags,
    /// Use kernel passthrough for complete copies when possible (default on).
    pub passthrough: bool,
    /// Attribute and entry TTL.
    pub attr_ttl: Duration,
    /// Control socket path (default from the mount point).
    pub socket: Option<PathBuf>,
    /// Group given the control socket (name or number), so another user can reach it.
    pub socket_group: Option<String>,
    /// Optional TCP listener of the control API (`127.0.0.1:9464`); off by default.
    pub listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token that allows changes over the TCP listener.
    pub token_file: Option<PathBuf>,
    /// Connections each control listener serves at once.
    pub control_connections: usize,
    /// How long a control client may take to send a request's headers.
    pub control_header_timeout: Duration,
    /// Make every change to the NAS as this (uid, gid) instead of the calling user.
    pub write_as: Option<(u32, u32)>,
    /// Serve complete copies while the NAS is offline (default on).
    pub offline_copies: bool,
    /// Adopt the Python node's copies from this directory at mount.
    pub adopt: Option<PathBuf>,
    /// How long a read may wait for the NAS before it fails with `EIO`.
    pub nas_timeout: Duration,
    /// FUSE request threads.
    pub threads: usize,
    /// Log file of a background daemon.
    pub log_file: Option<PathBuf>,
    /// `env=FILE`: the env file to read.
    pub env_file: Option<PathBuf>,
    /// Settings given as options, in order: (name, value).
    pub settings: Vec<(String, String)>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: true,
            default_permissions: true,
            read_only: false,
            flags: MsFlags::empty(),
            passthrough: true,
            attr_ttl: DEFAULT_ATTR_TTL,
            socket: None,
            socket_group: None,
            listen: None,
            token_file: None,
            control_connections: crate::control::Limits::default().max_connections,
            control_header_timeout: crate::control::Limits::default().header_timeout,
            write_as: None,
            offline_copies: true,
            adopt: None,
            nas_timeout: Duration::from_secs(30),
            threads: 8,
            log_file: None,
            env_file: None,
            settings: Vec::new(),
        }
    }
}

impl MountOptions {
    /// Checks the options as a whole, once all are applied: refuses combinations that would be
    /// unsafe.
    pub fn validate(&self) -> Result<(), String> {
        if self.allow_other && !self.default_permissions {
            // The daemon runs as root and opens NAS files for whoever asks: without the kernel's
            // permission checks, any user of the machine could read every file.
            return Err(
                "option nodefault_permissions needs noallow_other: with allow_other (the \
                        default) every user could read any NAS file through the mount without \
                        a permission check"
                    .to_string(),
            );
        }
        Ok(())
    }

    /// Applies one comma-separated `-o` string. Unknown options are refused, not ignored.
    pub fn apply_opts(&mut self, opts: &str) -> Result<(), String> {
        for opt in opts.split(',').filter(|o| !o.is_empty()) {
            self.apply_opt(opt)?;
        }
        Ok(())
    }

    fn apply_opt(&mut self, opt: &str) -> Result<(), String> {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let need = |_: ()| value.ok_or_else(|| format!("option {key} needs a value ({key}=...)"));
        match key {
            "socket" => self.socket = Some(PathBuf::from(need(())?)),
            "socket_group" => self.socket_group = Some(need(())?.to_string()),
            "listen" => {
                let v = need(())?;
                self.listen = Some(v.trim().parse().map_err(|_| {
                    format!("option {key}: '{v}' is not an address:port (e.g. 127.0.0.1:9464)")
                })?)
            }
            "token_file" => self.token_file = Some(PathBuf::from(need(())?)),
            "adopt" => self.adopt = Some(PathBuf::from(need(())?)),
            "write_as" => {
                let v = need(())?;
                let ids = v
                    .split_once(':')
                    .and_then(|(u, g)| Some((u.trim().parse().ok()?, g.trim().parse().ok()?)))
                    .ok_or_else(|| format!("option {key}: '{v}' is not UID:GID (numbers)"))?;
                self.write_as = Some(ids);
            }
            "log_file" => self.log_file = Some(PathBuf::from(need(())?)),
            "env" => self.env_file = Some(PathBuf::from(need(())?)),
            "passthrough" => {
                self.passthrough =
                    config::boolean(need(())?).map_err(|e| format!("option {key}: {e}"))?
            }
            "offline_copies" => {
                self.offline_copies =
                    config::boolean(need(())?).map_err(|e| format!("option {key}: {e}"))?
            }
            "attr_timeout" => {
                let v = need(())?;
                let secs = v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e9)
                    .ok_or_else(|| format!("option {key}: '{v}' is not a non-negative number"))?;
                self.attr_ttl = Duration::from_secs_f64(secs);
            }
            "nas_timeout" => self.nas_timeout = positive_seconds(key, need(())?)?,
            "control_connections" => {
                let v = need(())?;
                self.control_connections = v
                    .trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=65536).contains(n))
                    .ok_or_else(|| {
                        format!("option {key}: '{v}' is not a whole number from 1 to 65536")
                    })?;
            }
            "control_header_timeout" => {
                self.control_header_timeout = positive_seconds(key, need(())?)?
            }
            "threads" => {
                let v = need(())?;
                let n: usize = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("option {key}: '{v}' is not a whole number"))?;
                self.threads = n.clamp(1, 256);
            }
            "allow_other" => self.allow_other = true,
            "noallow_other" | "no_allow_other" => self.allow_other = false,
            "default_permissions" => self.default_permissions = true,
            "nodefault_permissions" | "no_default_permissions" => self.default_permissions = false,
            "ro" => self.read_only = true,
            "rw" => self.read_only = false,
            "noatime" => self.flags |= MsFlags::MS_NOATIME,
            "nodiratime" => self.flags |= MsFlags::MS_NODIRATIME,
            "relatime" => self.flags |= MsFlags::MS_RELATIME,
            "strictatime" => self.flags |= MsFlags::MS_STRICTATIME,
            "noexec" => self.flags |= MsFlags::MS_NOEXEC,
            "dirsync" => self.flags |= MsFlags::MS_DIRSYNC,
            // Standard mount(8) / fstab options that concern mount(8) or systemd, not us.
            "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser" | "users"
            | "exec" | "atime" | "nosuid" | "nodev" | "async" | "sync" | "suid" | "dev"
            | "fsname" | "subtype" => {}
            k if k.starts_with("x-") || k.starts_with("comment=") => {}
            k if config::find_key(k).is_some() => {
                self.settings.push((k.to_string(), need(())?.to_string()));
            }
            _ => return Err(format!("unknown mount option '{opt}'")),
        }
        Ok(())
    }
}

/// A positive number of seconds (fractions allowed) for option `key`.
fn positive_seconds(key: &str, v: &str) -> Result<Duration, String> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f > 0.0 && *f < 1e6)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("option {key}: '{v}' is not a positive number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_style_options() {
        let mut c = MountOptions::default();
        c.apply_opts("cache_dir=/ssd/a,env=/etc/arenafs/models.env,allow_other,_netdev,nofail,x-systemd.requires-mounts-for=/mnt/nas,min_size_mb=0,categories=loras:unet,noatime,rw,cache_max_gb=50")
            .unwrap();
        assert_eq!(
            c.env_file.as_deref(),
            Some(std::path::Path::new("/etc/arenafs/models.env"))
        );
        assert!(c.flags.contains(MsFlags::MS_NOATIME));
        assert_eq!(
            c.settings,
            [
                ("cache_dir".to_string(), "/ssd/a".to_string()),
                ("min_size_mb".into(), "0".into()),
                ("categories".into(), "loras:unet".into()),
                ("cache_max_gb".into(), "50".into())
            ]
        );
    }

    #[test]
    fn defaults_and_overrides() {
        let mut c = MountOptions::default();
        assert!(c.allow_other && c.default_permissions && c.passthrough);
        c.apply_opts("noallow_other,nodefault_permissions,passthrough=0,attr_timeout=0.5")
            .unwrap();
        assert!(!c.allow_other && !c.default_permissions && !c.passthrough);
        assert_eq!(c.attr_ttl, Duration::from_millis(500));
        c.apply_opts("listen=127.0.0.1:9464,token_file=/etc/arenafs/token,socket_group=comfy")
            .unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.socket_group.as_deref(), Some("comfy"));
        assert_eq!(
            (c.control_connections, c.control_header_timeout),
            (64, Duration::from_secs(10))
        );
        c.apply_opts("control_connections=8,control_header_timeout=2.5")
            .unwrap();
        assert_eq!(
            (c.control_connections, c.control_header_timeout),
            (8, Duration::from_millis(2500))
        );
    }

    #[test]
    fn nodefault_permissions_needs_noallow_other() {
        let with = |opts: &str| {
            let mut c = MountOptions::default();
            c.apply_opts(opts).unwrap();
            c.validate()
        };
        assert!(with("").is_ok());
        for bad in [
            "nodefault_permissions",
            "no_default_permissions",
            "allow_other,nodefault_permissions",
            "noallow_other,nodefault_permissions,allow_other",
        ] {
            let err = with(bad).unwrap_err();
            assert!(
                err.contains("nodefault_permissions") && err.contains("noallow_other"),
                "{bad}: {err}"
            );
        }
        for good in [
            "noallow_other,nodefault_permissions",
            "nodefault_permissions,no_allow_other",
            "noallow_other",
            "allow_other,default_permissions",
            "nodefault_permissions,default_permissions",
        ] {
            assert!(with(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            "bogus",
            "cache_dir",
            "passthrough=maybe",
            "attr_timeout=-1",
            "threads=x",
            "env",
            "listen=localhost",
            "write_as=comfy",
            "write_as=1000",
            "listen=9464",
            "control_connections=0",
            "control_connections=many",
            "control_header_timeout=0",
            "control_header_timeout",
        ] {
            let err = MountOptions::default().apply_opts(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(
            MountOptions::default()
                .apply_opts("bogus")
                .unwrap_err()
                .contains("unknown mount option 'bogus'")
        );
    }
}
