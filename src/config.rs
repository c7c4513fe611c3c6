//! Service configuration: every flag is also a `LORKD_*` environment variable (clap), listed by `--print-env-vars`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{CommandFactory, Parser, ValueEnum};

/// Which ONNX Runtime execution provider runs the experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// CPU only.
    Cpu,
    /// CUDA; refuse to start when the loaded ONNX Runtime has no CUDA EP or no GPU answers.
    Cuda,
    /// CUDA when the loaded library has it and a GPU answers, else CPU (the choice is logged).
    Auto,
}

/// How batches run (issue 8; README "Execution paths").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    /// Per batch, the cheaper of the two by measured run times: a batch of one assembled (hot) expert runs
    /// merged, a batch of many experts runs mixed; hot experts are assembled in the background.
    Auto,
    /// Every request's expert is assembled (cached) and batches hold one expert each.
    Merged,
    /// Every batch runs on the mixed-task graph; nothing is assembled.
    Mixed,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// lorkd: serves LoRKD task experts (shared student + per-task low-rank deltas) over HTTP.
#[derive(Debug, Clone, Parser, serde::Serialize)]
#[command(name = "lorkd", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "LORKD_HOST", default_value = "0.0.0.0")]
    pub host: String,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "LORKD_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Package folder (models/FORMAT.md v1).
    #[arg(long, env = "LORKD_PACKAGE", default_value = "models/medmnist-lorkd")]
    #[serde(skip)]
    pub package: PathBuf,

    /// Path of libonnxruntime.so; when unset, ORT_DYLIB_PATH, then the system search path.
    /// (Empty means unset, so the listing's `LORKD_ORT_LIBRARY=` line can be used as is.)
    #[arg(long, env = "LORKD_ORT_LIBRARY", default_value = "")]
    #[serde(skip)]
    pub ort_library: String,

    /// Execution provider: cpu, cuda or auto.
    #[arg(long, env = "LORKD_PROVIDER", value_enum, default_value_t = Provider::Auto)]
    pub provider: Provider,

    /// CUDA device ordinal (provider cuda/auto).
    #[arg(long, env = "LORKD_CUDA_DEVICE", default_value_t = 0)]
    pub cuda_device: i32,

    /// ONNX Runtime intra-op threads (0 = ONNX Runtime's default, one per core).
    #[arg(long, env = "LORKD_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,

    /// Byte budget of the assembled-expert cache (accepts K/M/G/KiB/MiB/GiB suffixes).
    #[arg(long, env = "LORKD_CACHE_BYTES", default_value = "512MiB", value_parser = parse_bytes)]
    pub cache_bytes: u64,

    /// Experts to assemble and warm up at start-up (comma separated task ids, or `all`).
    #[arg(long, env = "LORKD_PRELOAD", value_delimiter = ',', default_value = "")]
    pub preload: Vec<String>,

    /// Experts that are preloaded and never evicted (comma separated task ids, or `all`).
    #[arg(long, env = "LORKD_PIN", value_delimiter = ',', default_value = "")]
    pub pin: Vec<String>,

    /// Most images in one ONNX Runtime run (one expert's batch, or a mixed batch of many experts).
    #[arg(long, env = "LORKD_MAX_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_size: u32,

    /// Longest a request waits for others to join its batch, in milliseconds.
    #[arg(long, env = "LORKD_MAX_BATCH_WAIT_MS", default_value_t = 2)]
    pub max_batch_wait_ms: u64,

    /// Most experts promoted from the shared session to their own session (weights baked in as plain initializers).
    /// 0 (default) runs every expert on the shared session: on CPU the two measured equally fast, and each
    /// dedicated session costs about 10-24 MiB more memory.
    #[arg(long, env = "LORKD_DEDICATED_SESSIONS", default_value_t = 0)]
    pub dedicated_sessions: u32,

    /// Requests an expert serves on the shared session before it is promoted to a dedicated session.
    #[arg(long, env = "LORKD_PROMOTE_AFTER", default_value_t = 64)]
    pub promote_after: u64,

    /// How batches run: `auto` (per batch, by measured cost), `merged` (assembled experts, one expert per batch)
    /// or `mixed` (the package's mixed-task graph, many experts per batch). Without a mixed-task graph in the
    /// package every mode runs merged.
    #[arg(long, env = "LORKD_EXECUTION", value_enum, default_value_t = Execution::Auto)]
    pub execution: Execution,

    /// `auto`: requests an expert must get within one second before it is assembled in the background (for
    /// merged runs of its own batches); 0 never assembles in `auto`.
    #[arg(long, env = "LORKD_ASSEMBLE_AFTER", default_value_t = 32)]
    pub assemble_after: u64,

    /// Most predict/infer requests admitted at once (decoding, queued or running); more get 429.
    #[arg(long, env = "LORKD_QUEUE_CAPACITY", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,

    /// Largest request body (accepts K/M/G/KiB/MiB/GiB suffixes); larger gets 413.
    #[arg(long, env = "LORKD_MAX_BODY_BYTES", default_value = "32MiB", value_parser = parse_bytes)]
    pub max_body_bytes: u64,

    /// Most images in one request (OIP batch dimension N, multipart image parts); more gets 413.
    #[arg(long, env = "LORKD_MAX_CLIENT_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_client_batch_size: u32,

    /// Byte budget of request memory in use at once: bodies being read, images and tensors being decoded, experts
    /// being assembled. When it is spent, new work gets 503 with Retry-After instead of growing memory.
    #[arg(long, env = "LORKD_REQUEST_MEMORY_BYTES", default_value = "256MiB", value_parser = parse_bytes)]
    pub request_memory_bytes: u64,

    /// Largest decoded image, in pixels (width x height), checked from the header before decoding; larger gets 422.
    #[arg(long, env = "LORKD_MAX_IMAGE_PIXELS", default_value_t = 16_777_216)]
    pub max_image_pixels: u64,

    /// Largest image width or height, checked from the header before decoding; larger gets 422.
    #[arg(long, env = "LORKD_MAX_IMAGE_SIDE", default_value_t = 8_192)]
    pub max_image_side: u32,

    /// Most open client connections; further connections wait in the listen backlog until one closes.
    #[arg(long, env = "LORKD_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A client must send a request's headers within this many milliseconds (also closes idle keep-alive
    /// connections), else the connection is closed.
    #[arg(long, env = "LORKD_HEADER_TIMEOUT_MS", default_value_t = 5_000)]
    pub header_timeout_ms: u64,

    /// A client must send the whole request body within this many milliseconds, else 408.
    #[arg(long, env = "LORKD_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_timeout_ms: u64,

    /// API keys accepted as `Authorization: Bearer <key>` (comma separated; several allow rotation). With no key
    /// here and no key file, authentication is off. Never logged or shown.
    #[arg(
        long,
        env = "LORKD_API_KEYS",
        value_delimiter = ',',
        default_value = "",
        hide_env_values = true
    )]
    #[serde(skip)]
    pub api_keys: Vec<String>,

    /// File with one API key per line (`#` comments and blank lines ignored), e.g. a mounted Kubernetes Secret.
    #[arg(long, env = "LORKD_API_KEYS_FILE", default_value = "")]
    #[serde(skip)]
    pub api_keys_file: String,

    /// Admin API keys (comma separated): `PUT/DELETE /v1/experts/{task}` and `POST /v1/admin/reload` need one
    /// of these as `Authorization: Bearer <key>`. None (and no admin key file): the admin API is off (403).
    #[arg(
        long,
        env = "LORKD_ADMIN_KEYS",
        value_delimiter = ',',
        default_value = "",
        hide_env_values = true
    )]
    #[serde(skip)]
    pub admin_keys: Vec<String>,

    /// File with one admin key per line (`#` comments), e.g. a mounted Kubernetes Secret.
    #[arg(long, env = "LORKD_ADMIN_KEYS_FILE", default_value = "")]
    #[serde(skip)]
    pub admin_keys_file: String,

    /// Writable folder where experts added, replaced or removed through the admin API are kept across restarts
    /// (the package folder stays read-only). Empty: admin changes live in memory until the process ends.
    #[arg(long, env = "LORKD_OVERLAY_DIR", default_value = "")]
    #[serde(skip)]
    pub overlay_dir: String,

    /// Separate port for operations (`/metrics`, `/v1/info`, health probes); 0 keeps them on the main port.
    /// When set, the main port no longer answers `/metrics` and `/v1/info`.
    #[arg(long, env = "LORKD_OPS_PORT", default_value_t = 0)]
    pub ops_port: u16,

    /// Time limit for one predict/infer request (decode, assembly, queue, inference) in milliseconds; over it gets 504.
    #[arg(long, env = "LORKD_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// On SIGTERM/Ctrl-C, how long in-flight requests may still finish, in milliseconds.
    #[arg(long, env = "LORKD_SHUTDOWN_TIMEOUT_MS", default_value_t = 25_000)]
    pub shutdown_timeout_ms: u64,

    /// Log format: json (one object per line) or pretty.
    #[arg(long, env = "LORKD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `lorkd=debug,info`.
    #[arg(long, env = "LORKD_LOG", default_value = "info")]
    pub log: String,

    /// Print every LORKD_* environment variable with its default (env-file format) and exit.
    #[arg(long, default_value_t = false)]
    #[serde(skip)]
    pub print_env_vars: bool,

    /// Load the package, print the memory plan of this configuration (JSON, bytes) and exit; the container's
    /// memory limit must be above its `total` (docs/deploy.md, "Memory").
    #[arg(long, default_value_t = false)]
    #[serde(skip)]
    pub print_memory_plan: bool,
}

impl Config {
    /// Parses a config from explicit arguments only (no environment), for tests and embedding.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut command = Self::command();
        // Environment variables must not leak into embedded configs (tests run in a shared process).
        let ids: Vec<_> = command
            .get_arguments()
            .map(|a| a.get_id().clone())
            .collect();
        for id in ids {
            command = command.mut_arg(id, |a| a.env(None::<&str>));
        }
        let matches = command.try_get_matches_from(
            std::iter::once("lorkd".into()).chain(args.into_iter().map(Into::into)),
        )?;
        <Self as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{host}:{}", self.port)
            .parse()
            .map_err(|e| format!("invalid listen address {host}:{}: {e}", self.port))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    pub fn max_batch_wait(&self) -> Duration {
        Duration::from_millis(self.max_batch_wait_ms)
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    pub fn ops_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.ops_port == 0 {
            return Ok(None);
        }
        if self.ops_port == self.port {
            return Err(format!(
                "LORKD_OPS_PORT ({}) must differ from LORKD_PORT",
                self.ops_port
            ));
        }
        let mut addr = self.listen_addr()?;
        addr.set_port(self.ops_port);
        Ok(Some(addr))
    }

    /// Every configured API key: `LORKD_API_KEYS` plus the lines of `LORKD_API_KEYS_FILE`. Empty: auth is off.
    pub fn load_api_keys(&self) -> Result<Vec<String>, String> {
        load_keys(&self.api_keys, &self.api_keys_file, "LORKD_API_KEYS_FILE")
    }

    /// Every admin key: `LORKD_ADMIN_KEYS` plus the lines of `LORKD_ADMIN_KEYS_FILE`. Empty: the admin API is off.
    pub fn load_admin_keys(&self) -> Result<Vec<String>, String> {
        load_keys(
            &self.admin_keys,
            &self.admin_keys_file,
            "LORKD_ADMIN_KEYS_FILE",
        )
    }
}

fn load_keys(listed: &[String], file: &str, file_variable: &str) -> Result<Vec<String>, String> {
    let mut keys: Vec<String> = listed
        .iter()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect();
    if !file.is_empty() {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {file_variable} {file}: {e}"))?;
        keys.extend(parse_key_file(&text));
        if keys.is_empty() {
            return Err(format!(
                "{file_variable} {file} holds no key: refusing to start with those keys off"
            ));
        }
    }
    if let Some(short) = keys.iter().find(|k| k.len() < MIN_KEY_LENGTH) {
        return Err(format!(
            "a key has {} characters; keys need at least {MIN_KEY_LENGTH}",
            short.len()
        ));
    }
    Ok(keys)
}

/// Shortest API key accepted (guessing a 16-character random key is out of reach).
pub const MIN_KEY_LENGTH: usize = 16;

/// Keys of a key file: one per line, surrounding blanks trimmed, `#` comments and empty lines skipped.
pub fn parse_key_file(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// Every `LORKD_*` variable with its default, as an env file (`# help` line, then `NAME=default`).
pub fn env_vars_listing() -> String {
    let command = Config::command();
    let mut out = String::new();
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if let Some(help) = arg.get_help() {
            out.push_str(&format!("# {help}\n"));
        }
        out.push_str(&format!(
            "{}={}\n",
            env.to_string_lossy(),
            default.join(",")
        ));
    }
    out
}

/// Parses a byte count with an optional unit: `1048576`, `64MiB`, `1G`, `512k`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count (examples: 1048576, 64MiB, 1G)"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        other => return Err(format!("unknown byte unit `{other}` in `{text}`")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_with_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1_048_576));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("2 kib"), Ok(2048));
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("MiB").is_err());
    }

    #[test]
    fn defaults_parse_and_listing_names_every_env_var() {
        let config = Config::from_args(Vec::<String>::new()).unwrap();
        assert_eq!(config.port, 8080);
        assert_eq!(config.max_body_bytes, 32 << 20);
        assert!(config.preload.iter().all(|p| p.is_empty()));
        let listing = env_vars_listing();
        for name in [
            "LORKD_PORT=8080",
            "LORKD_PACKAGE=",
            "LORKD_CACHE_BYTES=512MiB",
            "LORKD_LOG_FORMAT=pretty",
        ] {
            assert!(listing.contains(name), "{name} missing from\n{listing}");
        }
        let vars = listing.lines().filter(|l| l.starts_with("LORKD_")).count();
        let args_with_env = Config::command()
            .get_arguments()
            .filter(|a| a.get_env().is_some())
            .count();
        assert_eq!(vars, args_with_env);
        assert!(!listing.contains("PRINT_ENV"));
    }

    #[test]
    fn empty_optional_values_mean_unset() {
        let config =
            Config::from_args(["--ort-library", "", "--pin", "", "--preload", ""]).unwrap();
        assert_eq!(config.ort_library, "");
        assert!(config.pin.iter().all(|p| p.is_empty()));
    }

    #[test]
    fn key_files_skip_comments_and_short_keys_are_refused() {
        assert_eq!(
            parse_key_file("# rotated 2026-11\n  key-one-0123456789  \n\nkey-two-0123456789\n"),
            ["key-one-0123456789", "key-two-0123456789"]
        );
        let config = Config::from_args(["--api-keys", "short"]).unwrap();
        assert!(config.load_api_keys().unwrap_err().contains("at least"));
        let config =
            Config::from_args(["--api-keys", "a-long-enough-key-1,a-long-enough-key-2"]).unwrap();
        assert_eq!(config.load_api_keys().unwrap().len(), 2);
        assert!(Config::from_args(Vec::<String>::new())
            .unwrap()
            .load_api_keys()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn secrets_and_paths_are_never_serialised() {
        let config = Config::from_args([
            "--api-keys",
            "a-long-enough-secret-key",
            "--package",
            "/secret/path/pkg",
        ])
        .unwrap();
        let text = serde_json::to_string(&config).unwrap();
        assert!(!text.contains("a-long-enough-secret-key"));
        assert!(!text.contains("/secret/path"));
        assert!(!text.contains("api_keys"));
    }

    #[test]
    fn listen_address_accepts_ipv6() {
        let config = Config::from_args(["--host", "::1", "--port", "0"]).unwrap();
        assert_eq!(config.listen_addr().unwrap().to_string(), "[::1]:0");
    }
}
