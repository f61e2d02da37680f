//! The HTTP API: one router per resource, merged here, all sharing one [`AppState`].
//!
//! The route handlers share one shape on purpose (extract the caller, authorise, call storage,
//! map rows to the contract's type): each reads on its own, and the shared parts — the caller,
//! the JSON body and query with contract errors, the error type — are the extractors in
//! `extract.rs` and `error.rs`.

mod alerts;
mod demo;
mod error;
mod events;
mod extract;
mod health;
mod ingest;
mod keys;
pub mod openapi;
mod sites;
mod units;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::IntoResponse;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

pub use demo::DEMO_ORG;
pub use error::AppError;
pub use events::KeyedLimits;
pub use extract::{Admin, Json, Query, User};
pub use keys::create_key;

use crate::auth::JwtVerifier;
use crate::config::Config;
use crate::store::Store;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub jwt: Arc<JwtVerifier>,
    pub ingest: crate::ingest::Ingest,
    pub units: Arc<crate::store::unit_cache::Units>,
    /// Redis health, when running as one of several nodes.
    pub redis: Option<crate::cluster::RedisHealth>,
    pub relay: crate::deliver::relay::Relay,
    pub outbox: crate::deliver::outbox::Outbox,
    /// Whether every essential task (the pipeline stages among them) is alive (`/readyz`).
    pub pipeline: crate::tasks::Health,
    /// Publish and ingest rate limits, by caller.
    pub rate_limits: Arc<events::KeyedLimits>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// This node's monitor, for the events an HTTP request commits (an acknowledgement): weak,
    /// so it does not keep the monitor running past the ingest writer at shutdown.
    pub announce: tokio::sync::mpsc::WeakSender<crate::ingest::Handover>,
}

/// The API routes (without Socket.io, which is a layer added in `lib.rs`). `edges` are the
/// routes of the other edges (the plain WebSocket), so that unknown paths and wrong methods get
/// one answer everywhere under `/api`.
pub fn router(state: AppState, edges: Router) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    Router::new()
        .merge(health::router())
        .merge(ingest::router())
        .merge(sites::router())
        .merge(units::router())
        .merge(alerts::router())
        .merge(keys::router())
        .merge(events::router())
        .merge(webhooks::router())
        .merge(demo::router(state.config.demo))
        .route(
            "/api/{*rest}",
            axum::routing::any(|| async { AppError::NotFound("no such endpoint".into()) }),
        )
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
        .merge(edges)
        .layer(axum::middleware::map_response(method_not_allowed_json))
}

/// axum answers a known path asked with another method by a 405 with an `Allow` header and no
/// body; every error of the API has the contract's `{ error, message }` body, this one too.
async fn method_not_allowed_json(res: axum::response::Response) -> axum::response::Response {
    if res.status() != axum::http::StatusCode::METHOD_NOT_ALLOWED {
        return res;
    }
    let allow = res.headers().get(axum::http::header::ALLOW).cloned();
    let mut json = AppError::MethodNotAllowed(match &allow {
        Some(methods) => format!(
            "method not allowed here; allowed: {}",
            methods.to_str().unwrap_or_default()
        ),
        None => "method not allowed here".into(),
    })
    .into_response();
    if let Some(methods) = allow {
        json.headers_mut()
            .insert(axum::http::header::ALLOW, methods);
    }
    json
}

/// CORS for browsers on other origins (the Vite dev server by default).
pub fn cors(origins: &[String]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
        ])
        .max_age(Duration::from_secs(600));
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

/// Parses an optional RFC 3339 query parameter into epoch milliseconds.
pub(crate) fn parse_time_param(name: &str, value: Option<&str>) -> Result<Option<i64>, AppError> {
    value
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.timestamp_millis())
                .map_err(|_| {
                    AppError::validation(name, "must be an RFC 3339 time like 2026-01-02T03:04:05Z")
                })
        })
        .transpose()
}
