//! Every setting, parsed and validated once at start.
//!
//! Settings come from flags or the environment variables operators' scripts already set (see
//! CONTRACT.md, "Configuration"). A bad value stops the start with one line naming the setting and
//! how to fix it ([`ConfigError`]); nothing later in the program re-reads the environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// The flags/environment of `sensorwire serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    #[command(flatten)]
    pub db: DbArgs,
    /// Redis for running several nodes (unset: single node, in-memory adapter).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    #[command(flatten)]
    pub jwt: JwtArgs,
    /// Accept the handshake token from the `token` query parameter too (off: it leaks into logs).
    #[arg(long, env = "ALLOW_TOKEN_IN_QUERY", default_value_t = false)]
    pub allow_token_in_query: bool,
    /// Let webhooks reach private, loopback and link-local addresses (tests, closed networks).
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE", default_value_t = false)]
    pub webhook_allow_private: bool,
    /// How often buffered readings are flushed to the organisation rooms.
    #[arg(long, env = "FLUSH_INTERVAL_MS", default_value_t = 1000)]
    pub flush_interval_ms: u64,
    /// Browser origins allowed by CORS, comma-separated (`*` allows any).
    #[arg(
        long,
        env = "CORS_ORIGINS",
        default_value = "http://localhost:5173",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// The built dashboard to serve at `/`.
    #[arg(long, env = "WEB_DIR", default_value = "web/dist")]
    pub web_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the data lives.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// `sqlite:PATH` (embedded, single node) or `postgres://…` (several nodes).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://data/sensorwire.db"
    )]
    pub database_url: String,
}

/// How JWTs are verified: HS256 with a shared secret, or RS256/ES256 with a public key or JWKS.
#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// HS256 shared secret (at least 16 bytes).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (RSA or EC) for RS256/ES256 tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file (RS256/ES256 keys chosen by `kid`).
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

/// Limits that protect the gateway from floods and broken clients.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Largest HTTP request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most readings in one ingest request.
    #[arg(long, env = "MAX_READINGS_PER_REQUEST", default_value_t = 1000)]
    pub max_readings_per_request: usize,
    /// Most readings in one `sensor:readings:batch` event; a larger window is split.
    #[arg(long, env = "BATCH_MAX_READINGS", default_value_t = 500)]
    pub batch_max_readings: usize,
    /// Readings stored but not yet flushed to clients before ingest answers 503.
    #[arg(long, env = "MAX_BUFFERED_READINGS", default_value_t = 200_000)]
    pub max_buffered_readings: usize,
    /// Ingest requests waiting for a commit before ingest answers 503.
    #[arg(long, env = "INGEST_QUEUE", default_value_t = 1024)]
    pub ingest_queue: usize,
    /// Milliseconds between sweeps for silent (offline) units.
    #[arg(long, env = "OFFLINE_SWEEP_MS", default_value_t = 1000)]
    pub offline_sweep_ms: u64,
    /// Events one publisher (API key or admin) may `POST /api/events` per second.
    #[arg(long, env = "PUBLISH_PER_SECOND", default_value_t = 50)]
    pub publish_per_second: u32,
    /// Ingest requests per second per API key (burst 2×; 429 beyond).
    #[arg(long, env = "INGEST_PER_SECOND_PER_KEY", default_value_t = 100)]
    pub ingest_per_second_per_key: u32,
    /// Ingest requests per second per organisation, all callers together (burst 2×; 429 beyond).
    #[arg(long, env = "INGEST_PER_SECOND_PER_ORG", default_value_t = 2000)]
    pub ingest_per_second_per_org: u32,
    /// Socket.io connections one user may hold on a node (tabs); more are refused.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 20)]
    pub max_connections_per_user: usize,
    /// Largest Socket.io packet a client may send, in bytes.
    #[arg(long, env = "SOCKET_MAX_PAYLOAD", default_value_t = 64 * 1024)]
    pub socket_max_payload: u64,
    /// Outgoing packets buffered per socket before it counts as a slow consumer.
    #[arg(long, env = "SOCKET_BUFFER_SIZE", default_value_t = 256)]
    pub socket_buffer_size: usize,
    /// Site and unit subscriptions one socket may hold.
    #[arg(long, env = "MAX_ROOMS_PER_SOCKET", default_value_t = 100)]
    pub max_rooms_per_socket: usize,
    /// Sustained client events per second per socket.
    #[arg(long, env = "SOCKET_EVENTS_PER_SECOND", default_value_t = 20)]
    pub socket_events_per_second: u32,
    /// Burst of client events a socket may send at once.
    #[arg(long, env = "SOCKET_EVENTS_BURST", default_value_t = 40)]
    pub socket_events_burst: u32,
    /// Refused events within 10 s after which a socket is disconnected.
    #[arg(long, env = "SOCKET_ABUSE_LIMIT", default_value_t = 50)]
    pub socket_abuse_limit: u32,
    /// Seconds a client has to complete the Socket.io handshake.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// Milliseconds between the server's engine.io pings.
    #[arg(long, env = "SOCKET_PING_INTERVAL_MS", default_value_t = 25_000)]
    pub socket_ping_interval_ms: u64,
    /// Milliseconds a client has to answer a ping before it is considered gone.
    #[arg(long, env = "SOCKET_PING_TIMEOUT_MS", default_value_t = 20_000)]
    pub socket_ping_timeout_ms: u64,
    /// Seconds organisation events stay available for replay after a reconnect.
    #[arg(long, env = "RECOVERY_WINDOW_SECS", default_value_t = 120)]
    pub recovery_window_secs: u64,
    /// Memory for the replay log of one node (all organisations), in bytes. With Redis the
    /// log is in Redis streams, sized by the window (see README "Operating").
    #[arg(long, env = "RECOVERY_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub recovery_max_bytes: usize,
    /// An optional cap on the events kept per organisation (none by default: retention is by
    /// time, within the byte budget).
    #[arg(long, env = "RECOVERY_MAX_EVENTS", default_value_t = 0)]
    pub recovery_max_events: usize,
}

/// A setting that cannot work, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {problem}")]
    Invalid { name: &'static str, problem: String },
}

fn invalid(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        problem: problem.into(),
    }
}

/// The validated configuration the library runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub database_url: String,
    pub redis_url: Option<String>,
    pub jwt: JwtArgs,
    pub allow_token_in_query: bool,
    /// Webhooks may reach private, loopback and link-local addresses.
    pub webhook_allow_private: bool,
    pub flush_interval: Duration,
    pub cors_origins: Vec<String>,
    pub limits: Limits,
    pub web_dir: PathBuf,
    /// Demo mode (`sensorwire demo`): enables `GET /api/demo/token`. Never set by `serve`.
    pub demo: bool,
}

impl Config {
    /// Validates the parsed flags. Every check here names the setting it rejects.
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let ip: IpAddr = args
            .host
            .parse()
            .map_err(|_| invalid("HOST", format!("{:?} is not an IP address", args.host)))?;
        check_database_url(&args.db.database_url)?;
        if let Some(url) = &args.redis_url {
            let schemes = [
                "redis://",
                "rediss://",
                "redis-cluster://",
                "rediss-cluster://",
            ];
            if !schemes.iter().any(|s| url.starts_with(s)) {
                return Err(invalid(
                    "REDIS_URL",
                    "must start with redis://, rediss://, redis-cluster:// or rediss-cluster://",
                ));
            }
            if args.db.database_url.starts_with("sqlite:") {
                return Err(invalid(
                    "DATABASE_URL",
                    "several nodes (REDIS_URL is set) cannot share an SQLite file; use postgres://",
                ));
            }
        }
        let jwt_sources = [
            args.jwt.jwt_secret.is_some(),
            args.jwt.jwt_public_key_file.is_some(),
            args.jwt.jwks_file.is_some(),
        ];
        if jwt_sources.iter().filter(|s| **s).count() > 1 {
            return Err(invalid(
                "JWT_SECRET",
                "set only one of JWT_SECRET, JWT_PUBLIC_KEY_FILE and JWKS_FILE",
            ));
        }
        if let Some(secret) = &args.jwt.jwt_secret
            && secret.len() < 16
        {
            return Err(invalid("JWT_SECRET", "must be at least 16 bytes long"));
        }
        if args.flush_interval_ms == 0 || args.flush_interval_ms > 60_000 {
            return Err(invalid("FLUSH_INTERVAL_MS", "must be between 1 and 60000"));
        }
        for origin in &args.cors_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(invalid(
                    "CORS_ORIGINS",
                    format!("{origin:?} is not an origin like https://dash.example.com"),
                ));
            }
        }
        let l = &args.limits;
        for (name, value) in [
            ("MAX_BODY_BYTES", l.max_body_bytes as u64),
            (
                "MAX_READINGS_PER_REQUEST",
                l.max_readings_per_request as u64,
            ),
            ("SOCKET_MAX_PAYLOAD", l.socket_max_payload),
            ("SOCKET_BUFFER_SIZE", l.socket_buffer_size as u64),
            ("MAX_ROOMS_PER_SOCKET", l.max_rooms_per_socket as u64),
            (
                "SOCKET_EVENTS_PER_SECOND",
                l.socket_events_per_second as u64,
            ),
            ("SOCKET_EVENTS_BURST", l.socket_events_burst as u64),
            ("SOCKET_ABUSE_LIMIT", l.socket_abuse_limit as u64),
            ("HANDSHAKE_TIMEOUT_SECS", l.handshake_timeout_secs),
            ("SOCKET_PING_INTERVAL_MS", l.socket_ping_interval_ms),
            ("SOCKET_PING_TIMEOUT_MS", l.socket_ping_timeout_ms),
            ("RECOVERY_WINDOW_SECS", l.recovery_window_secs),
            ("RECOVERY_MAX_BYTES", l.recovery_max_bytes as u64),
            ("BATCH_MAX_READINGS", l.batch_max_readings as u64),
            ("MAX_BUFFERED_READINGS", l.max_buffered_readings as u64),
            ("INGEST_QUEUE", l.ingest_queue as u64),
            ("OFFLINE_SWEEP_MS", l.offline_sweep_ms),
            ("PUBLISH_PER_SECOND", l.publish_per_second as u64),
            (
                "INGEST_PER_SECOND_PER_KEY",
                l.ingest_per_second_per_key as u64,
            ),
            (
                "INGEST_PER_SECOND_PER_ORG",
                l.ingest_per_second_per_org as u64,
            ),
            (
                "MAX_CONNECTIONS_PER_USER",
                l.max_connections_per_user as u64,
            ),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be greater than 0"));
            }
        }
        Ok(Config {
            addr: SocketAddr::new(ip, args.port),
            database_url: args.db.database_url,
            redis_url: args.redis_url,
            jwt: args.jwt,
            allow_token_in_query: args.allow_token_in_query,
            webhook_allow_private: args.webhook_allow_private,
            flush_interval: Duration::from_millis(args.flush_interval_ms),
            cors_origins: args.cors_origins,
            limits: args.limits,
            web_dir: args.web_dir,
            demo: false,
        })
    }
}

pub fn check_database_url(url: &str) -> Result<(), ConfigError> {
    if url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        Ok(())
    } else {
        Err(invalid(
            "DATABASE_URL",
            format!(
                "{url:?} must start with sqlite: (e.g. sqlite://data/sensorwire.db) or postgres://"
            ),
        ))
    }
}
