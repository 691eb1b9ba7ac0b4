//! Mount options: `-o` strings (as `mount.fuse3` and fstab pass them) and their flag twins.

use std::path::PathBuf;
use std::time::Duration;

use nix::mount::MsFlags;

use crate::policy::{DEFAULT_CATEGORIES, DEFAULT_MIN_SIZE, Policy};

/// Everything a mount is configured with.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// SSD cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Size floor in bytes.
    pub min_size: u64,
    /// Allowed categories.
    pub categories: Vec<String>,
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
    /// Concurrent background copies.
    pub max_concurrency: usize,
    /// FUSE request threads.
    pub threads: usize,
    /// Log file of a background daemon.
    pub log_file: Option<PathBuf>,
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            min_size: DEFAULT_MIN_SIZE,
            categories: DEFAULT_CATEGORIES.iter().map(|s| s.to_string()).collect(),
            allow_other: true,
            default_permissions: true,
            read_only: false,
            flags: MsFlags::empty(),
            passthrough: true,
            attr_ttl: Duration::from_secs(1),
            socket: None,
            max_concurrency: 2,
            threads: 8,
            log_file: None,
        }
    }
}

impl MountConfig {
    /// The caching policy these options describe.
    pub fn policy(&self) -> Policy {
        Policy::new(self.categories.iter().map(String::as_str), self.min_size)
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
            "cache_dir" => self.cache_dir = Some(PathBuf::from(need(())?)),
            "socket" => self.socket = Some(PathBuf::from(need(())?)),
            "log_file" => self.log_file = Some(PathBuf::from(need(())?)),
            "min_size_mb" | "cache_min_size_mb" => {
                self.min_size = parse_num(key, need(())?)? * 1000 * 1000
            }
            "categories" | "cache_categories" => {
                // `,` separates -o options, so lists use `:` there.
                self.categories = need(())?
                    .split([':', '+'])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "passthrough" => self.passthrough = parse_bool(key, need(())?)?,
            "attr_timeout" => self.attr_ttl = Duration::from_secs_f64(parse_f64(key, need(())?)?),
            "max_concurrency" | "cache_max_concurrency" => {
                self.max_concurrency = parse_num(key, need(())?)?.max(1) as usize
            }
            "threads" => self.threads = parse_num(key, need(())?)?.clamp(1, 256) as usize,
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
            _ => return Err(format!("unknown mount option '{opt}'")),
        }
        Ok(())
    }
}

fn parse_num(key: &str, v: &str) -> Result<u64, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("option {key}: '{v}' is not a whole number"))
}

fn parse_f64(key: &str, v: &str) -> Result<f64, String> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .ok_or_else(|| format!("option {key}: '{v}' is not a non-negative number"))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "option {key}: '{v}' is not a boolean (1/0/true/false/yes/no)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_style_options() {
        let mut c = MountConfig::default();
        c.apply_opts("cache_dir=/ssd/a,allow_other,_netdev,nofail,x-systemd.requires-mounts-for=/mnt/nas,min_size_mb=0,categories=loras:unet,noatime,rw")
            .unwrap();
        assert_eq!(c.cache_dir.as_deref(), Some(std::path::Path::new("/ssd/a")));
        assert_eq!(c.min_size, 0);
        assert_eq!(c.categories, ["loras", "unet"]);
        assert!(c.flags.contains(MsFlags::MS_NOATIME));
        assert!(
            c.policy().decide("diffusion_models/x".as_ref(), 1) == crate::policy::Decision::Cache
        );
    }

    #[test]
    fn defaults_and_overrides() {
        let mut c = MountConfig::default();
        assert!(c.allow_other && c.default_permissions && c.passthrough);
        c.apply_opts("noallow_other,nodefault_permissions,passthrough=0,attr_timeout=0.5")
            .unwrap();
        assert!(!c.allow_other && !c.default_permissions && !c.passthrough);
        assert_eq!(c.attr_ttl, Duration::from_millis(500));
    }

    #[test]
    fn bad_options_are_refused() {
        for bad in [
            "bogus",
            "cache_dir",
            "min_size_mb=ten",
            "passthrough=maybe",
            "attr_timeout=-1",
        ] {
            let err = MountConfig::default().apply_opts(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(
            MountConfig::default()
                .apply_opts("bogus")
                .unwrap_err()
                .contains("unknown mount option 'bogus'")
        );
    }
}
