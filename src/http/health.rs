//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive")))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Prometheus text exposition of every `sensorwire_*` metric.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(app): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
}

/// Storage (and Redis, when configured) reachable.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready to serve"),
              (status = 503, description = "A dependency is unreachable")))]
pub async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Value>) {
    let storage = app.store.ping().await;
    let redis = app.redis.as_ref().map(|r| (r.is_up(), r.describe()));
    let failed = app.pipeline.reason();
    let ready = storage.is_ok() && redis.is_none_or(|(up, _)| up) && failed.is_none();
    let mut body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "storage": match &storage { Ok(()) => "ok".to_string(), Err(e) => e.to_string() },
        "pipeline": failed.map_or("ok".to_string(), |why| format!("failed: {why}")),
    });
    if let Some((_, state)) = redis {
        body["redis"] = json!(state);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
