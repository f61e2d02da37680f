//! sensorwire: a real-time gateway for sensor dashboards.
//!
//! [`run`] builds the whole gateway from a [`Config`]: storage, the Socket.io server with its
//! adapter, the HTTP API, and serves them on a listener the caller bound, until the caller's
//! shutdown future completes. Nothing here reads the environment; `main.rs` does that once.

pub mod auth;
pub mod config;
pub mod http;
pub mod proto;
pub mod realtime;
pub mod store;
pub mod wire;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use socketioxide::adapter::LocalAdapter;
use socketioxide::handler::ConnectHandler;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use auth::JwtVerifier;
pub use config::Config;
use store::Store;

/// Where the embedded defaults keep their files (the SQLite database, the development secret).
pub const DATA_DIR: &str = "data";

/// Builds the JWT verifier, falling back to a development secret under `data/` for a single
/// node with no key configured (a cluster must share a configured key).
pub fn jwt_verifier(config: &Config) -> anyhow::Result<JwtVerifier> {
    let j = &config.jwt;
    let configured =
        j.jwt_secret.is_some() || j.jwt_public_key_file.is_some() || j.jwks_file.is_some();
    let dev = if configured || config.redis_url.is_some() {
        None
    } else {
        tracing::warn!(
            "no JWT_SECRET, JWT_PUBLIC_KEY_FILE or JWKS_FILE set: using the development secret in \
             {DATA_DIR}/dev-jwt-secret (set JWT_SECRET in production)"
        );
        Some(
            auth::jwt::dev_secret(Path::new(DATA_DIR))
                .context("creating the development secret")?,
        )
    };
    Ok(JwtVerifier::from_args(j, dev)?)
}

/// Runs the gateway on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let jwt = Arc::new(jwt_verifier(&config)?);
    let store = Store::open(&config.database_url)
        .await
        .with_context(|| format!("DATABASE_URL: cannot open {}", redact(&config.database_url)))?;
    tracing::info!(engine = store.engine_name(), "storage ready");

    let ctx = realtime::Ctx {
        store: store.clone(),
        jwt: jwt.clone(),
        limits: Arc::new(config.limits.clone()),
        allow_token_in_query: config.allow_token_in_query,
    };
    let (socket_layer, io) = realtime::builder(&config, ctx).build_layer();
    io.ns(
        "/",
        realtime::on_connect::<LocalAdapter>.with(realtime::authenticate::<LocalAdapter>),
    );

    let state = http::AppState {
        config: config.clone(),
        store: store.clone(),
        jwt,
    };
    let app: Router = http::router(state)
        .layer(socket_layer)
        .layer(TraceLayer::new_for_http())
        .layer(http::cors(&config.cors_origins));

    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving")?;
    io.close().await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
