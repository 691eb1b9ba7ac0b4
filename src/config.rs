//! Settings: built-in defaults < the env file < `ARENA_*` environment variables < `-o` options and
//! flags (DESIGN.md §5).
//!
//! Every key of the original Arena AutoCache `arena_autocache.env` is understood and acts, plus a
//! few new ones (bandwidth cap, excludes, pins, prefetch allow-list, free-space reserve). Each key
//! has an `-o` twin: lower case without `ARENA_` (`ARENA_CACHE_MAX_GB` → `cache_max_gb=`).
//!
//! Bad input never stops the daemon: an unknown key, a bad number or boolean, an unknown mode or
//! category is a warning with its file and line; a value that cannot be used falls back to the
//! default and the warning says so. The key table ([`KEYS`]) is data: the parser, `arenafs config
//! check` and the documentation test all read it, so docs and code cannot drift.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::policy::{DEFAULT_CATEGORIES, KNOWN_CATEGORIES, category_key};

/// The env file read when neither `--env` nor `ARENA_ENV_FILE` names one.
pub const DEFAULT_ENV_FILE: &str = "/etc/arenafs/arenafs.env";

/// One setting: its names, default and documentation.
#[derive(Debug)]
pub struct KeyDef {
    /// Name in env files and the environment.
    pub env: &'static str,
    /// Name as an `-o` option.
    pub opt: &'static str,
    /// Other accepted `-o` spellings.
    pub aliases: &'static [&'static str],
    /// Default, as written in docs.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
    /// An example value.
    pub example: &'static str,
}

macro_rules! keys {
    ($($env:literal, $opt:literal, [$($alias:literal),*], $default:literal, $example:literal, $doc:literal;)*) => {
        /// Every setting arenafs reads.
        pub const KEYS: &[KeyDef] = &[$(KeyDef {
            env: $env, opt: $opt, aliases: &[$($alias),*], default: $default, doc: $doc, example: $example,
        }),*];
    };
}

keys! {
    "ARENA_NAS_ROOT", "nas_root", [], "", "/mnt/nas/models",
        "The NAS directory to present, when the command line gives none.";
    "ARENA_CACHE_ROOT", "cache_root", ["cache_dir"], "", "/ssd/arenafs",
        "The SSD cache directory, when no flag gives one. arenafs keeps its data in its own versioned subdirectory there and never touches other files (such as the old node's copies).";
    "ARENA_AUTO_CACHE_ENABLED", "auto_cache_enabled", [], "1", "1",
        "0 turns caching off entirely (gray: pure pass-through to the NAS, existing copies unused).";
    "ARENA_AUTOCACHE_AUTOPATCH", "autocache_autopatch", [], "1", "0",
        "With caching enabled: 1 serves copies and makes new ones (red); 0 serves existing copies but makes none (green).";
    "ARENA_CACHE_MODE", "cache_mode", [], "ondemand", "eager",
        "ondemand: copy files as they are loaded or requested; eager: also copy every allowed file at start, only within ARENA_CACHE_SESSION_BYTE_BUDGET; disabled: like ARENA_AUTO_CACHE_ENABLED=0.";
    "ARENA_CACHE_MAX_GB", "cache_max_gb", [], "0", "500",
        "Upper bound of the cache size in GB (10^9 bytes); 0 = unlimited (the free-space reserve still applies). Least recently used copies are evicted to stay below it.";
    "ARENA_CACHE_MIN_SIZE_MB", "cache_min_size_mb", ["min_size_mb"], "10", "100",
        "Files smaller than this many MB (10^6 bytes) are read from the NAS without caching.";
    "ARENA_CACHE_MIN_SIZE_GB", "cache_min_size_gb", [], "", "1",
        "The size floor in GB (10^9 bytes), as the original's v2 spelled it; overrides ARENA_CACHE_MIN_SIZE_MB from the same or a lower source.";
    "ARENA_CACHE_CATEGORIES", "cache_categories", ["categories"], "checkpoints,loras,vae,text_encoders,diffusion_models,controlnet,upscale_models,embeddings,hypernetworks,clip_vision,style_models,gligen,photomaker,model_patches,audio_encoders", "loras,vae",
        "Categories (first folder under the NAS root) to cache, comma-separated (':' in -o). Folder spellings map to ComfyUI keys: clip = text_encoders, unet = diffusion_models, t2i_adapter = controlnet.";
    "ARENA_CACHE_CATEGORIES_MODE", "cache_categories_mode", [], "extend", "override",
        "extend: ARENA_CACHE_CATEGORIES is added to the default list; override: it replaces the list.";
    "ARENA_CACHE_VERBOSE", "cache_verbose", [], "0", "1",
        "1 logs at debug level (RUST_LOG, when set, wins).";
    "ARENA_CACHE_DISCOVERY", "cache_discovery", [], "workflow_only", "manual_only",
        "workflow_only: complete in the background the files of the required set (sent through the control API) and files being loaded for real (read past a threshold); manual_only: complete only files named by an explicit prefetch. Reads always keep what they fetched.";
    "ARENA_CACHE_PREFETCH_STRATEGY", "cache_prefetch_strategy", [], "lazy", "prefetch_allowlist",
        "lazy: copies start when files are loaded or requested; prefetch_allowlist: also copy, at start and on reload, the files listed in ARENA_CACHE_PREFETCH_ALLOWLIST.";
    "ARENA_CACHE_MAX_CONCURRENCY", "cache_max_concurrency", ["max_concurrency"], "2", "4",
        "Background copies running at once.";
    "ARENA_CACHE_SESSION_BYTE_BUDGET", "cache_session_byte_budget", [], "0", "200000000000",
        "Bytes background copies may fetch from the NAS per daemon run; 0 = no budget. When spent, new copies are refused (BUDGET_EXCEEDED).";
    "ARENA_CACHE_COOLDOWN_MS", "cache_cooldown_ms", [], "5000", "10000",
        "Minimum time between two bulk requests (prefetch lists, required sets); a request within it is refused (COOLDOWN_ACTIVE).";
    "ARENA_CACHE_SKIP_HARDCODED", "cache_skip_hardcoded", [], "0", "1",
        "1 never caches paths naming controlnet, control_net, insightface, ipadapter or clip_vision (any component, any case).";
    "ARENA_CACHE_BWLIMIT_MBPS", "cache_bwlimit_mbps", [], "0", "80",
        "Cap on the NAS bandwidth background copies use, in MB/s (10^6 bytes); 0 = none. Readers are never capped.";
    "ARENA_CACHE_EXCLUDE", "cache_exclude", [], "", "**/*.ckpt,loras/test/**",
        "Glob patterns (comma-separated; ':' in -o) of NAS-relative paths never cached.";
    "ARENA_CACHE_PIN", "cache_pin", [], "", "checkpoints/sdxl/**",
        "Glob patterns (comma-separated; ':' in -o) of NAS-relative paths whose copies are never evicted or trimmed unless named explicitly.";
    "ARENA_CACHE_PREFETCH_ALLOWLIST", "cache_prefetch_allowlist", [], "", "/etc/arenafs/prefetch.txt",
        "File listing models to copy with ARENA_CACHE_PREFETCH_STRATEGY=prefetch_allowlist: one category/file per line, # comments.";
    "ARENA_CACHE_IDENTITY", "cache_identity", ["identity"], "size_mtime_ino", "size_mtime",
        "What makes a cache copy still the NAS file's: size_mtime_ino (size, mtime in ns and inode number), size_mtime (for NAS mounts without stable inode numbers, e.g. SMB with noserverino) or size_mtime_ino_ctime (also the change time: catches rewrites that restore the mtime, drops copies on any metadata change). Read at mount. Files modified less than 2 s ago are read from the NAS, not copied.";
    "ARENA_CACHE_STABLE_SECS", "cache_stable_secs", ["stable_secs"], "2", "3",
        "A file modified less than this many seconds ago is read from the NAS, not copied: NAS timestamps can be coarse (1 s on SMB, 2 s on FAT-backed shares), and a file rewritten within one tick would keep its identity with other bytes. 0 for a NAS with nanosecond timestamps.";
    "ARENA_HTTP_SOURCE", "http_source", [], "", "http://nas.example:8080/models",
        "The base URL under which the NAS root is also served over HTTP. Background copies then fetch bytes with ranged GETs from it (through ARENA_HTTP_PROXY when set), falling back to the NAS per file on any mismatch; lookups, listings and writes stay on the NAS. Read at mount. docs/farm.md.";
    "ARENA_HTTP_PROXY", "http_proxy", [], "", "http://127.0.0.1:4001",
        "A forward proxy for ARENA_HTTP_SOURCE: a Squid tier, or a Dragonfly dfdaemon on this node. Read at mount.";
    "ARENA_HTTP_HEADERS", "http_headers", [], "X-Dragonfly-Prefetch: true", "X-Dragonfly-Prefetch: true; X-Team: render",
        "Extra headers of ARENA_HTTP_SOURCE requests, 'Name: value' separated by ';' (the default makes a Dragonfly peer pull the whole file behind a ranged miss). Read at mount.";
    "ARENA_UPDATE_MANIFEST", "update_manifest", [], "", "/etc/arenafs/models.toml",
        "The model updater's manifest of tracked models (TOML; docs/updater.md). With it the daemon serves /arena/update/* and, with ARENA_UPDATE_WINDOW, checks and installs updates on its own.";
    "ARENA_UPDATE_WINDOW", "update_window", [], "", "Mon-Fri 02:00-05:00",
        "When the daemon checks and installs updates of the manifest's models by itself (local time; several windows separated by ';'). Unset: only when asked (arenafs update, /arena/update/*).";
    "ARENA_HF_ENDPOINT", "hf_endpoint", [], "$HF_ENDPOINT, else https://huggingface.co", "http://127.0.0.1:8080",
        "The Hugging Face Hub's base URL for the updater; unset, the HF_ENDPOINT variable that Hugging Face's own tools read.";
    "ARENA_CIVITAI_ENDPOINT", "civitai_endpoint", [], "https://civitai.com", "http://127.0.0.1:8080",
        "CivitAI's base URL for the updater.";
    "ARENA_HF_TOKEN_FILE", "hf_token_file", [], "", "/etc/arenafs/hf_token",
        "A file holding the Hugging Face token (mode 0600 or stricter), when HF_TOKEN is not set. Sent only to the Hub's own host.";
    "ARENA_CIVITAI_TOKEN_FILE", "civitai_token_file", [], "", "/etc/arenafs/civitai_token",
        "A file holding the CivitAI API key (mode 0600 or stricter), when CIVITAI_TOKEN is not set. Sent only to CivitAI's own host.";
    "ARENA_CACHE_MIN_FREE_GB", "cache_min_free_gb", [], "5% of the cache file system", "50",
        "Free space (GB, 10^9 bytes) always left on the cache file system; copies stop and old copies are evicted to keep it.";
}

/// Checks `value` for the key named `name` (any of its names) as an env file line is read: the
/// key's env name and the warnings that do not refuse the value (an unknown category, say), or
/// why the value is refused.
pub fn check_value(name: &str, value: &str) -> Result<(&'static str, Vec<String>), String> {
    let def = find_key(name).ok_or_else(|| format!("unknown key {name}"))?;
    let mut b = Builder::default();
    b.apply(def, value.trim(), &Source::Option)
        .map_err(|m| format!("{}: {m}", def.env))?;
    Ok((def.env, b.warnings.into_iter().map(|w| w.message).collect()))
}

/// Looks a key up by its env name or any of its `-o` names.
pub fn find_key(name: &str) -> Option<&'static KeyDef> {
    KEYS.iter()
        .find(|k| k.env == name || k.opt == name || k.aliases.contains(&name))
}

/// What the daemon does with copies (DESIGN.md §4: the original's three states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheState {
    /// Pure pass-through: copies are neither served nor made.
    Gray,
    /// Existing complete copies are served; no new copies are made.
    Green,
    /// Copies are served and made.
    Red,
}

/// `ARENA_CACHE_MODE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Copy on demand.
    Ondemand,
    /// Copy everything allowed at start, within the byte budget.
    Eager,
    /// No caching.
    Disabled,
}

/// `ARENA_CACHE_DISCOVERY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// Complete the required set and files loaded for real.
    WorkflowOnly,
    /// Complete only explicitly prefetched files.
    ManualOnly,
}

/// `ARENA_CACHE_PREFETCH_STRATEGY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefetchStrategy {
    /// Copy when loaded or requested.
    Lazy,
    /// Also copy the allow-list at start and on reload.
    PrefetchAllowlist,
}

/// `ARENA_CACHE_CATEGORIES_MODE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CategoriesMode {
    /// Add to the defaults.
    Extend,
    /// Replace the defaults.
    Override,
}

/// The effective settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Settings {
    /// NAS directory.
    pub nas_root: Option<PathBuf>,
    /// Cache directory.
    pub cache_dir: Option<PathBuf>,
    /// `ARENA_AUTO_CACHE_ENABLED`.
    pub enabled: bool,
    /// `ARENA_AUTOCACHE_AUTOPATCH`.
    pub autopatch: bool,
    /// `ARENA_CACHE_MODE`.
    pub mode: CacheMode,
    /// Cache size cap in bytes (0 = unlimited).
    pub max_bytes: u64,
    /// Size floor in bytes.
    pub min_size: u64,
    /// Categories given by the settings (before extend/override).
    pub categories: Vec<String>,
    /// How `categories` combine with the defaults.
    pub categories_mode: CategoriesMode,
    /// Debug logging.
    pub verbose: bool,
    /// Discovery mode.
    pub discovery: Discovery,
    /// Prefetch strategy.
    pub prefetch: PrefetchStrategy,
    /// Concurrent background copies.
    pub max_concurrency: usize,
    /// Byte budget per run (0 = none).
    pub session_byte_budget: u64,
    /// Cooldown between bulk requests.
    #[serde(with = "millis")]
    pub cooldown: Duration,
    /// Never cache the hard-coded families.
    pub skip_hardcoded: bool,
    /// Background bandwidth cap in bytes/s (0 = none).
    pub bwlimit: u64,
    /// Exclude globs.
    pub exclude: Vec<String>,
    /// Pin globs.
    pub pin: Vec<String>,
    /// Prefetch allow-list file.
    pub prefetch_allowlist: Option<PathBuf>,
    /// The HTTP source of bulk bytes.
    pub http_source: Option<String>,
    /// Its forward proxy.
    pub http_proxy: Option<String>,
    /// Its extra headers.
    pub http_headers: Vec<(String, String)>,
    /// The updater's manifest.
    pub update_manifest: Option<PathBuf>,
    /// The updater's windows, as written (checked when read).
    pub update_window: Option<String>,
    /// The Hub's base URL for the updater.
    pub hf_endpoint: Option<String>,
    /// CivitAI's base URL for the updater.
    pub civitai_endpoint: Option<String>,
    /// Token files of the updater.
    pub hf_token_file: Option<PathBuf>,
    /// Token files of the updater.
    pub civitai_token_file: Option<PathBuf>,
    /// Free-space reserve in bytes; `None` = 5 % of the cache file system.
    pub min_free: Option<u64>,
    /// What makes a copy still the NAS file's (read at mount).
    pub identity: crate::source::IdentityRule,
    /// Files modified less recently than this are not copied yet.
    #[serde(with = "millis")]
    pub stable_after: Duration,
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nas_root: None,
            cache_dir: None,
            enabled: true,
            autopatch: true,
            mode: CacheMode::Ondemand,
            max_bytes: 0,
            min_size: crate::policy::DEFAULT_MIN_SIZE,
            categories: Vec::new(),
            categories_mode: CategoriesMode::Extend,
            verbose: false,
            discovery: Discovery::WorkflowOnly,
            prefetch: PrefetchStrategy::Lazy,
            max_concurrency: 2,
            session_byte_budget: 0,
            cooldown: Duration::from_millis(5000),
            skip_hardcoded: false,
            bwlimit: 0,
            exclude: Vec::new(),
            pin: Vec::new(),
            prefetch_allowlist: None,
            http_source: None,
            http_proxy: None,
            http_headers: crate::httpsrc::parse_headers(crate::httpsrc::DEFAULT_HEADERS)
                .unwrap_or_default(),
            update_manifest: None,
            update_window: None,
            hf_endpoint: None,
            civitai_endpoint: None,
            hf_token_file: None,
            civitai_token_file: None,
            min_free: None,
            identity: crate::source::IdentityRule::SizeMtimeIno,
            stable_after: Duration::from_secs(2),
        }
    }
}

impl Settings {
    /// The gray/green/red state these settings put the cache in.
    pub fn state(&self) -> CacheState {
        if !self.enabled || self.mode == CacheMode::Disabled {
            CacheState::Gray
        } else if !self.autopatch {
            CacheState::Green
        } else {
            CacheState::Red
        }
    }

    /// The allowed category keys after extend/override.
    pub fn effective_categories(&self) -> Vec<String> {
        let mut out: Vec<String> = match self.categories_mode {
            CategoriesMode::Extend => DEFAULT_CATEGORIES.iter().map(|s| s.to_string()).collect(),
            CategoriesMode::Override => Vec::new(),
        };
        for c in &self.categories {
            let key = category_key(c).to_string();
            if !out.contains(&key) {
                out.push(key);
            }
        }
        out
    }
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Built in.
    Default,
    /// An env file line.
    File(PathBuf, usize),
    /// The daemon's environment.
    Environment,
    /// A `-o` option or flag.
    Option,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p, line) => write!(f, "{}:{line}", p.display()),
            Source::Environment => write!(f, "environment"),
            Source::Option => write!(f, "option"),
        }
    }
}

/// A problem with one setting; the daemon goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Where the bad value was.
    pub source: Source,
    /// What is wrong and what was done about it.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.source, self.message)
    }
}

/// Errors that stop loading.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The env file named explicitly could not be read.
    #[error("env file {path}: {source}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An `-o` option is not a setting.
    #[error("unknown option '{0}'")]
    UnknownOption(String),
}

/// The result of loading settings.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The settings.
    pub settings: Settings,
    /// Where each key that is not at its default came from (by env name).
    pub sources: BTreeMap<&'static str, Source>,
    /// Problems found.
    pub warnings: Vec<Warning>,
    /// The env file read, if any.
    pub env_file: Option<PathBuf>,
}

impl Loaded {
    /// The source of a key (default when not set).
    pub fn source_of(&self, env: &str) -> Source {
        self.sources.get(env).cloned().unwrap_or(Source::Default)
    }
}

/// What to load settings from.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// `--env FILE` (or `-o env=FILE`); an error if unreadable.
    pub env_file: Option<PathBuf>,
    /// The daemon's environment (only `ARENA_*` is read).
    pub environment: Vec<(String, String)>,
    /// `-o` options and flags that are settings, in order: (name, value).
    pub options: Vec<(String, String)>,
}

impl Inputs {
    /// Inputs from this process's environment.
    pub fn from_process(env_file: Option<PathBuf>, options: Vec<(String, String)>) -> Self {
        Self {
            env_file,
            environment: std::env::vars()
                .filter(|(k, _)| k.starts_with("ARENA_"))
                .collect(),
            options,
        }
    }

    /// The env file to read: explicit, else `ARENA_ENV_FILE`, else the default when it exists.
    pub fn env_file_path(&self) -> Option<(PathBuf, bool)> {
        if let Some(p) = &self.env_file {
            return Some((p.clone(), true));
        }
        if let Some((_, v)) = self.environment.iter().find(|(k, _)| k == "ARENA_ENV_FILE") {
            return Some((PathBuf::from(v), true));
        }
        let default = Path::new(DEFAULT_ENV_FILE);
        default.exists().then(|| (default.to_path_buf(), false))
    }
}

/// Loads settings from defaults, the env file, the environment and options.
pub fn load(inputs: &Inputs) -> Result<Loaded, ConfigError> {
    let mut b = Builder::default();
    let env_file = inputs.env_file_path();
    if let Some((path, _explicit)) = &env_file {
        let text = std::fs::read(path).map_err(|source| ConfigError::Unreadable {
            path: path.clone(),
            source,
        })?;
        b.read_env_file(path, &text);
    }
    for (k, v) in &inputs.environment {
        if k == "ARENA_ENV_FILE" {
            continue;
        }
        b.set_named(k, v, Source::Environment, true);
    }
    for (k, v) in &inputs.options {
        if find_key(k).is_none() {
            return Err(ConfigError::UnknownOption(k.clone()));
        }
        // In -o, ',' separates options, so lists use ':' there.
        let v = if matches!(
            find_key(k).map(|d| d.env),
            Some("ARENA_CACHE_CATEGORIES" | "ARENA_CACHE_EXCLUDE" | "ARENA_CACHE_PIN")
        ) {
            v.replace(':', ",")
        } else {
            v.clone()
        };
        b.set_named(k, &v, Source::Option, false);
    }
    Ok(Loaded {
        settings: b.settings,
        sources: b.sources,
        warnings: b.warnings,
        env_file: env_file.map(|(p, _)| p),
    })
}

#[derive(Default)]
struct Builder {
    settings: Settings,
    sources: BTreeMap<&'static str, Source>,
    warnings: Vec<Warning>,
}

impl Builder {
    fn warn(&mut self, source: &Source, message: String) {
        self.warnings.push(Warning {
            source: source.clone(),
            message,
        });
    }

    fn read_env_file(&mut self, path: &Path, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        for (i, line) in text.lines().enumerate() {
            let source = Source::File(path.to_path_buf(), i + 1);
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            // One line at a time, so every warning has its line; multi-line values are not
            // supported (none of the keys needs one).
            for item in dotenvy::from_read_iter(line.as_bytes()) {
                match item {
                    Ok((k, v)) => self.set_named(&k, &v, source.clone(), true),
                    Err(e) => self.warn(&source, format!("cannot parse line ({e}); ignored")),
                }
            }
        }
    }

    /// Sets a key by any of its names.
    fn set_named(&mut self, name: &str, value: &str, source: Source, warn_unknown: bool) {
        let Some(def) = find_key(name) else {
            if warn_unknown {
                self.warn(&source, format!("unknown key {name}; ignored"));
            }
            return;
        };
        match self.apply(def, value.trim(), &source) {
            Ok(()) => {
                self.sources.insert(def.env, source);
            }
            Err(msg) => self.warn(
                &source,
                format!("{}: {msg}; keeping {}", def.env, self.current(def)),
            ),
        }
    }

    fn current(&self, def: &KeyDef) -> String {
        match self.sources.get(def.env) {
            Some(s) => format!("the value from {s}"),
            None if def.default.is_empty() => "it unset".into(),
            None => format!("the default ({})", def.default),
        }
    }

    fn apply(&mut self, def: &KeyDef, v: &str, source: &Source) -> Result<(), String> {
        let s = &mut self.settings;
        match def.env {
            "ARENA_NAS_ROOT" => s.nas_root = Some(path(v)?),
            "ARENA_CACHE_ROOT" => s.cache_dir = Some(path(v)?),
            "ARENA_AUTO_CACHE_ENABLED" => s.enabled = boolean(v)?,
            "ARENA_AUTOCACHE_AUTOPATCH" => s.autopatch = boolean(v)?,
            "ARENA_CACHE_MODE" => {
                s.mode = match v.to_ascii_lowercase().as_str() {
                    "ondemand" | "on_demand" | "lazy" => CacheMode::Ondemand,
                    "eager" => CacheMode::Eager,
                    "disabled" | "off" => CacheMode::Disabled,
                    _ => return Err(format!("'{v}' is not ondemand, eager or disabled")),
                }
            }
            "ARENA_CACHE_MAX_GB" => s.max_bytes = gb(v)?,
            "ARENA_CACHE_MIN_SIZE_MB" => s.min_size = (number(v)? * 1e6) as u64,
            "ARENA_CACHE_MIN_SIZE_GB" => s.min_size = gb(v)?,
            "ARENA_CACHE_CATEGORIES" => {
                let list = list(v);
                let unknown: Vec<_> = list
                    .iter()
                    .filter(|c| !KNOWN_CATEGORIES.contains(&category_key(c)))
                    .cloned()
                    .collect();
                if !unknown.is_empty() {
                    self.warnings.push(Warning {
                        source: source.clone(),
                        message: format!(
                            "ARENA_CACHE_CATEGORIES: unknown categories {} (not ComfyUI's; kept, in case a custom node uses them)",
                            unknown.join(", ")
                        ),
                    });
                }
                self.settings.categories = list;
            }
            "ARENA_CACHE_CATEGORIES_MODE" => {
                s.categories_mode = match v.to_ascii_lowercase().as_str() {
                    "extend" => CategoriesMode::Extend,
                    "override" => CategoriesMode::Override,
                    _ => return Err(format!("'{v}' is not extend or override")),
                }
            }
            "ARENA_CACHE_VERBOSE" => s.verbose = boolean(v)?,
            "ARENA_CACHE_STABLE_SECS" => {
                let secs = v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && (0.0..=3600.0).contains(f))
                    .ok_or_else(|| format!("'{v}' is not a number of seconds from 0 to 3600"))?;
                s.stable_after = Duration::from_secs_f64(secs);
            }
            "ARENA_CACHE_IDENTITY" => {
                s.identity = crate::source::IdentityRule::parse(v).ok_or_else(|| {
                    format!("'{v}' is not size_mtime, size_mtime_ino or size_mtime_ino_ctime")
                })?
            }
            "ARENA_CACHE_DISCOVERY" => {
                s.discovery = match v.to_ascii_lowercase().as_str() {
                    "workflow_only" => Discovery::WorkflowOnly,
                    "manual_only" => Discovery::ManualOnly,
                    _ => return Err(format!("'{v}' is not workflow_only or manual_only")),
                }
            }
            "ARENA_CACHE_PREFETCH_STRATEGY" => {
                s.prefetch = match v.to_ascii_lowercase().as_str() {
                    "lazy" => PrefetchStrategy::Lazy,
                    "prefetch_allowlist" => PrefetchStrategy::PrefetchAllowlist,
                    _ => return Err(format!("'{v}' is not lazy or prefetch_allowlist")),
                }
            }
            "ARENA_CACHE_MAX_CONCURRENCY" => {
                let n = whole(v)?;
                if !(1..=64).contains(&n) {
                    return Err(format!("'{v}' is not between 1 and 64"));
                }
                s.max_concurrency = n as usize;
            }
            "ARENA_CACHE_SESSION_BYTE_BUDGET" => s.session_byte_budget = whole(v)?,
            "ARENA_CACHE_COOLDOWN_MS" => s.cooldown = Duration::from_millis(whole(v)?),
            "ARENA_CACHE_SKIP_HARDCODED" => s.skip_hardcoded = boolean(v)?,
            "ARENA_CACHE_BWLIMIT_MBPS" => s.bwlimit = (number(v)? * 1e6) as u64,
            "ARENA_CACHE_EXCLUDE" => s.exclude = globs(v)?,
            "ARENA_CACHE_PIN" => s.pin = globs(v)?,
            "ARENA_CACHE_PREFETCH_ALLOWLIST" => s.prefetch_allowlist = Some(path(v)?),
            "ARENA_CACHE_MIN_FREE_GB" => s.min_free = Some(gb(v)?),
            "ARENA_HTTP_SOURCE" => {
                let probe = crate::httpsrc::HttpSource::check_url(v, "ARENA_HTTP_SOURCE")?;
                s.http_source = Some(probe);
            }
            "ARENA_HTTP_PROXY" => {
                s.http_proxy = Some(crate::httpsrc::HttpSource::check_url(
                    v,
                    "ARENA_HTTP_PROXY",
                )?)
            }
            "ARENA_HTTP_HEADERS" => s.http_headers = crate::httpsrc::parse_headers(v)?,
            "ARENA_UPDATE_MANIFEST" => s.update_manifest = Some(path(v)?),
            "ARENA_UPDATE_WINDOW" => {
                crate::update::window::Windows::parse(v)?;
                s.update_window = Some(v.to_string());
            }
            "ARENA_HF_ENDPOINT" => {
                crate::update::http::Service::new("huggingface", v, None)?;
                s.hf_endpoint = Some(v.trim_end_matches('/').to_string());
            }
            "ARENA_CIVITAI_ENDPOINT" => {
                crate::update::http::Service::new("civitai", v, None)?;
                s.civitai_endpoint = Some(v.trim_end_matches('/').to_string());
            }
            "ARENA_HF_TOKEN_FILE" => s.hf_token_file = Some(path(v)?),
            "ARENA_CIVITAI_TOKEN_FILE" => s.civitai_token_file = Some(path(v)?),
            other => unreachable!("key {other} has no parser"),
        }
        Ok(())
    }
}

fn path(v: &str) -> Result<PathBuf, String> {
    if v.is_empty() {
        return Err("empty path".into());
    }
    Ok(PathBuf::from(v))
}

/// `1/0/true/false/yes/no/on/off`, any case.
pub fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("'{v}' is not a boolean (1/0/true/false/yes/no)")),
    }
}

fn number(v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .ok_or_else(|| format!("'{v}' is not a non-negative number"))
}

fn whole(v: &str) -> Result<u64, String> {
    v.replace('_', "")
        .parse::<u64>()
        .map_err(|_| format!("'{v}' is not a whole number"))
}

fn gb(v: &str) -> Result<u64, String> {
    Ok((number(v)? * 1e9) as u64)
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn globs(v: &str) -> Result<Vec<String>, String> {
    let l = list(v);
    for g in &l {
        globset::Glob::new(g).map_err(|e| format!("bad pattern '{g}': {e}"))?;
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, env: &[(&str, &str)], opts: &[(&str, &str)]) -> Loaded {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("arena_autocache.env");
        std::fs::write(&f, text).unwrap();
        load(&Inputs {
            env_file: Some(f),
            environment: env
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            options: opts
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        })
        .unwrap()
    }

    #[test]
    fn original_env_file_keeps_its_meaning() {
        let l = load_text(
            "# Arena AutoCache\nARENA_AUTO_CACHE_ENABLED=1\nARENA_AUTOCACHE_AUTOPATCH=0\n\
             ARENA_CACHE_ROOT=/ssd/cache\nARENA_CACHE_MAX_GB=500\nARENA_CACHE_MIN_SIZE_MB=100\n\
             ARENA_CACHE_CATEGORIES=loras,unet\nARENA_CACHE_CATEGORIES_MODE=override\n\
             export ARENA_CACHE_VERBOSE=true\nARENA_CACHE_DISCOVERY=manual_only\n\
             ARENA_CACHE_PREFETCH_STRATEGY=prefetch_allowlist\nARENA_CACHE_MAX_CONCURRENCY=3\n\
             ARENA_CACHE_SESSION_BYTE_BUDGET=1000\nARENA_CACHE_COOLDOWN_MS=250\n\
             ARENA_CACHE_SKIP_HARDCODED=yes\nARENA_NAS_ROOT=\"/mnt/nas models\"\n",
            &[],
            &[],
        );
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
        let s = &l.settings;
        assert_eq!(s.state(), CacheState::Green);
        assert_eq!(s.cache_dir.as_deref(), Some(Path::new("/ssd/cache")));
        assert_eq!(s.max_bytes, 500_000_000_000);
        assert_eq!(s.min_size, 100_000_000);
        assert_eq!(s.effective_categories(), ["loras", "diffusion_models"]);
        assert!(s.verbose && s.skip_hardcoded);
        assert_eq!(s.discovery, Discovery::ManualOnly);
        assert_eq!(s.prefetch, PrefetchStrategy::PrefetchAllowlist);
        assert_eq!((s.max_concurrency, s.session_byte_budget), (3, 1000));
        assert_eq!(s.cooldown, Duration::from_millis(250));
        assert_eq!(s.nas_root.as_deref(), Some(Path::new("/mnt/nas models")));
        assert!(matches!(
            l.source_of("ARENA_CACHE_MAX_GB"),
            Source::File(_, 5)
        ));
    }

    #[test]
    fn states() {
        let state = |t: &str| load_text(t, &[], &[]).settings.state();
        assert_eq!(state(""), CacheState::Red);
        assert_eq!(state("ARENA_AUTO_CACHE_ENABLED=0\n"), CacheState::Gray);
        assert_eq!(state("ARENA_CACHE_MODE=disabled\n"), CacheState::Gray);
        assert_eq!(
            state("ARENA_AUTO_CACHE_ENABLED=1\nARENA_AUTOCACHE_AUTOPATCH=1\n"),
            CacheState::Red
        );
        assert_eq!(
            state("ARENA_AUTO_CACHE_ENABLED=1\nARENA_AUTOCACHE_AUTOPATCH=0\n"),
            CacheState::Green
        );
        assert_eq!(Settings::default().state(), CacheState::Red);
    }

    #[test]
    fn precedence_file_env_options() {
        let l = load_text(
            "ARENA_CACHE_MAX_GB=1\nARENA_CACHE_MIN_SIZE_MB=1\nARENA_CACHE_COOLDOWN_MS=1\n",
            &[
                ("ARENA_CACHE_MIN_SIZE_MB", "2"),
                ("ARENA_CACHE_COOLDOWN_MS", "2"),
            ],
            &[("cache_cooldown_ms", "3")],
        );
        assert_eq!(l.settings.max_bytes, 1_000_000_000);
        assert_eq!(l.settings.min_size, 2_000_000);
        assert_eq!(l.settings.cooldown, Duration::from_millis(3));
        assert_eq!(l.source_of("ARENA_CACHE_MIN_SIZE_MB"), Source::Environment);
        assert_eq!(l.source_of("ARENA_CACHE_COOLDOWN_MS"), Source::Option);
        assert_eq!(l.source_of("ARENA_CACHE_PIN"), Source::Default);
    }

    #[test]
    fn malformed_lines_warn_with_file_and_line_and_keep_defaults() {
        let l = load_text(
            "ARENA_CACHE_MAX_GB=lots\n\
             ARENA_AUTO_CACHE_ENABLED=maybe\n\
             ARENA_CACHE_MODE=turbo\n\
             ARENA_CACHE_DISCOVERY=everything\n\
             ARENA_CACHE_PREFETCH_STRATEGY=all\n\
             ARENA_CACHE_CATEGORIES_MODE=merge\n\
             ARENA_CACHE_MAX_CONCURRENCY=0\n\
             ARENA_CACHE_MAX_CONCURRENCY=-3\n\
             ARENA_CACHE_COOLDOWN_MS=1.5\n\
             ARENA_CACHE_MIN_SIZE_MB=-1\n\
             ARENA_CACHE_MIN_SIZE_MB=NaN\n\
             ARENA_CACHE_EXCLUDE=a[b\n\
             ARENA_CACHE_CATEGORIES=loras,my_custom_models\n\
             ARENA_CACHE_ROOT=\n\
             ARENA_UNKNOWN_THING=1\n\
             NOT_EVEN_ARENA=1\n\
             this line has no equals sign\n\
             ARENA_CACHE_VERBOSE='unterminated\n\
             =novalue\n\
             ARENA_CACHE_SESSION_BYTE_BUDGET=1e9\n",
            &[],
            &[],
        );
        let lines: Vec<usize> = l
            .warnings
            .iter()
            .map(|w| match &w.source {
                Source::File(_, n) => *n,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, (1..=20).collect::<Vec<_>>(), "{:#?}", l.warnings);
        let s = &l.settings;
        let d = Settings::default();
        assert_eq!(
            (
                s.max_bytes,
                s.enabled,
                s.mode,
                s.max_concurrency,
                s.cooldown,
                s.min_size
            ),
            (
                d.max_bytes,
                d.enabled,
                d.mode,
                d.max_concurrency,
                d.cooldown,
                d.min_size
            )
        );
        assert!(l.warnings[0].to_string().contains(
            ":1: ARENA_CACHE_MAX_GB: 'lots' is not a non-negative number; keeping the default (0)"
        ));
        // An unknown category is kept (custom nodes have their own folders), with a warning.
        assert_eq!(s.categories, ["loras", "my_custom_models"]);
        assert!(s.cache_dir.is_none());
    }

    #[test]
    fn env_vars_warn_without_file() {
        let l = load_text(
            "",
            &[("ARENA_CACHE_MAX_GB", "x"), ("ARENA_BOGUS", "1")],
            &[],
        );
        assert_eq!(l.warnings.len(), 2);
        assert!(l.warnings.iter().all(|w| w.source == Source::Environment));
    }

    #[test]
    fn options_use_colons_for_lists_and_refuse_unknown_names() {
        let l = load_text(
            "",
            &[],
            &[("cache_categories", "loras:vae"), ("categories", "unet")],
        );
        assert_eq!(l.settings.categories, ["unet"]);
        let l = load_text("", &[], &[("cache_exclude", "a/**:b/*.ckpt")]);
        assert_eq!(l.settings.exclude, ["a/**", "b/*.ckpt"]);
        let err = load(&Inputs {
            options: vec![("bogus".into(), "1".into())],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("unknown option 'bogus'"));
    }

    #[test]
    fn explicit_env_file_must_be_readable() {
        let err = load(&Inputs {
            env_file: Some("/nonexistent/arena.env".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::Unreadable { .. }));
        let via_var = Inputs {
            environment: vec![("ARENA_ENV_FILE".into(), "/nonexistent/x.env".into())],
            ..Default::default()
        };
        assert!(load(&via_var).is_err());
    }

    #[test]
    fn every_key_has_a_parser_and_its_example_parses() {
        for k in KEYS {
            let l = load(&Inputs {
                environment: vec![(k.env.to_string(), k.example.to_string())],
                ..Default::default()
            })
            .unwrap();
            assert!(l.warnings.is_empty(), "{}: {:?}", k.env, l.warnings);
            assert_eq!(l.source_of(k.env), Source::Environment, "{}", k.env);
            assert!(k.opt.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            assert_eq!(
                k.env.strip_prefix("ARENA_").unwrap().to_ascii_lowercase(),
                k.opt
            );
        }
    }

    #[test]
    fn huge_and_binary_files_do_not_panic() {
        let mut junk = Vec::new();
        for i in 0..20000u32 {
            junk.extend_from_slice(&i.to_le_bytes());
            junk.extend_from_slice(b"=\x00\xff\n");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("junk.env");
        std::fs::write(&f, &junk).unwrap();
        let l = load(&Inputs {
            env_file: Some(f),
            ..Default::default()
        })
        .unwrap();
        assert!(!l.warnings.is_empty());
    }
}

/// The settings in force, swapped as a whole when the env file is reloaded; readers take a
/// cheap snapshot (an `Arc`) and never see half of an update.
#[derive(Debug)]
pub struct Live {
    inner: parking_lot::RwLock<(
        std::sync::Arc<Settings>,
        std::sync::Arc<crate::policy::Policy>,
    )>,
}

impl Live {
    /// Starts with `settings`.
    pub fn new(settings: Settings) -> Self {
        let policy = crate::policy::Policy::from_settings(&settings);
        Self {
            inner: parking_lot::RwLock::new((settings.into(), policy.into())),
        }
    }

    /// The current settings.
    pub fn settings(&self) -> std::sync::Arc<Settings> {
        self.inner.read().0.clone()
    }

    /// The current policy.
    pub fn policy(&self) -> std::sync::Arc<crate::policy::Policy> {
        self.inner.read().1.clone()
    }

    /// Replaces the settings (and the policy derived from them).
    pub fn replace(&self, settings: Settings) {
        let policy = crate::policy::Policy::from_settings(&settings);
        *self.inner.write() = (settings.into(), policy.into());
    }
}

/// A key's value in `settings`, as `config check` shows it.
pub fn display_value(s: &Settings, env: &str) -> String {
    let opt_path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let b = |v: bool| if v { "1" } else { "0" }.to_string();
    match env {
        "ARENA_NAS_ROOT" => opt_path(&s.nas_root),
        "ARENA_CACHE_ROOT" => opt_path(&s.cache_dir),
        "ARENA_AUTO_CACHE_ENABLED" => b(s.enabled),
        "ARENA_AUTOCACHE_AUTOPATCH" => b(s.autopatch),
        "ARENA_CACHE_MODE" => format!("{:?}", s.mode).to_ascii_lowercase(),
        "ARENA_CACHE_MAX_GB" => format!("{}", s.max_bytes as f64 / 1e9),
        "ARENA_CACHE_MIN_SIZE_MB" => format!("{}", s.min_size as f64 / 1e6),
        "ARENA_CACHE_MIN_SIZE_GB" => format!("{}", s.min_size as f64 / 1e9),
        "ARENA_CACHE_CATEGORIES" => s.effective_categories().join(","),
        "ARENA_CACHE_CATEGORIES_MODE" => format!("{:?}", s.categories_mode).to_ascii_lowercase(),
        "ARENA_CACHE_VERBOSE" => b(s.verbose),
        "ARENA_CACHE_IDENTITY" => s.identity.name().into(),
        "ARENA_CACHE_STABLE_SECS" => format!("{}", s.stable_after.as_secs_f64()),
        "ARENA_CACHE_DISCOVERY" => match s.discovery {
            Discovery::WorkflowOnly => "workflow_only".into(),
            Discovery::ManualOnly => "manual_only".into(),
        },
        "ARENA_CACHE_PREFETCH_STRATEGY" => match s.prefetch {
            PrefetchStrategy::Lazy => "lazy".into(),
            PrefetchStrategy::PrefetchAllowlist => "prefetch_allowlist".into(),
        },
        "ARENA_CACHE_MAX_CONCURRENCY" => s.max_concurrency.to_string(),
        "ARENA_CACHE_SESSION_BYTE_BUDGET" => s.session_byte_budget.to_string(),
        "ARENA_CACHE_COOLDOWN_MS" => s.cooldown.as_millis().to_string(),
        "ARENA_CACHE_SKIP_HARDCODED" => b(s.skip_hardcoded),
        "ARENA_CACHE_BWLIMIT_MBPS" => format!("{}", s.bwlimit as f64 / 1e6),
        "ARENA_CACHE_EXCLUDE" => s.exclude.join(","),
        "ARENA_CACHE_PIN" => s.pin.join(","),
        "ARENA_CACHE_PREFETCH_ALLOWLIST" => opt_path(&s.prefetch_allowlist),
        "ARENA_HTTP_SOURCE" => s.http_source.clone().unwrap_or_default(),
        "ARENA_HTTP_PROXY" => s.http_proxy.clone().unwrap_or_default(),
        "ARENA_HTTP_HEADERS" => s
            .http_headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
        "ARENA_UPDATE_MANIFEST" => opt_path(&s.update_manifest),
        "ARENA_UPDATE_WINDOW" => s.update_window.clone().unwrap_or_default(),
        "ARENA_HF_ENDPOINT" => s.hf_endpoint.clone().unwrap_or_else(|| {
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
        }),
        "ARENA_CIVITAI_ENDPOINT" => s
            .civitai_endpoint
            .clone()
            .unwrap_or_else(|| "https://civitai.com".into()),
        "ARENA_HF_TOKEN_FILE" => opt_path(&s.hf_token_file),
        "ARENA_CIVITAI_TOKEN_FILE" => opt_path(&s.civitai_token_file),
        "ARENA_CACHE_MIN_FREE_GB" => match s.min_free {
            Some(v) => format!("{}", v as f64 / 1e9),
            None => "5% of the cache file system".into(),
        },
        _ => String::new(),
    }
}

/// The settings table of `docs/configuration.md`, generated from [`KEYS`].
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| key | `-o` option | default | meaning | example |\n|---|---|---|---|---|\n",
    );
    for k in KEYS {
        let opt = std::iter::once(k.opt)
            .chain(k.aliases.iter().copied())
            .map(|o| format!("`{o}=`"))
            .collect::<Vec<_>>()
            .join(", ");
        let default = if k.default.is_empty() {
            "(unset)".to_string()
        } else {
            format!("`{}`", k.default)
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | `{}` |\n",
            k.env,
            opt,
            default,
            k.doc.replace('|', "\\|"),
            k.example
        ));
    }
    out
}

#[cfg(test)]
mod doc_tests {
    /// docs/configuration.md carries the generated table between markers; regenerate it with
    /// `UPDATE_DOCS=1 cargo test --lib config::doc_tests`.
    #[test]
    fn configuration_doc_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
        let text = std::fs::read_to_string(path).unwrap();
        let (begin, end) = ("<!-- keys:begin -->\n", "<!-- keys:end -->");
        let a = text.find(begin).expect("begin marker") + begin.len();
        let b = text.find(end).expect("end marker");
        let table = super::markdown_table();
        if text[a..b] != table {
            if std::env::var("UPDATE_DOCS").is_ok() {
                std::fs::write(path, format!("{}{}{}", &text[..a], table, &text[b..])).unwrap();
            } else {
                panic!(
                    "docs/configuration.md is out of date: run UPDATE_DOCS=1 cargo test --lib config::doc_tests"
                );
            }
        }
    }
}
