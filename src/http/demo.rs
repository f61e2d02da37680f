//! `GET /api/demo/token`: a short-lived token for the demo organisation's `demo-viewer` user, so
//! the demo dashboard can sign in (and renew) with no identity provider. The user is an operator,
//! not a viewer, so that the demo can acknowledge alerts. Exists only under `sensorwire demo`;
//! `serve` never mounts it.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{AppError, AppState};
use crate::auth::{Role, UserClaims, jwt::now_secs};

pub const DEMO_ORG: &str = "demo";
pub const DEMO_TOKEN_TTL_SECS: i64 = 15 * 60;

pub fn router(enabled: bool) -> Router<AppState> {
    if enabled {
        Router::new().route("/api/demo/token", get(token))
    } else {
        Router::new()
    }
}

async fn token(State(app): State<AppState>) -> Result<Json<Value>, AppError> {
    let claims = UserClaims {
        sub: "demo-viewer".into(),
        org_id: DEMO_ORG.into(),
        role: Role::Operator,
        site_ids: None,
        exp: now_secs() + DEMO_TOKEN_TTL_SECS,
    };
    let token = app
        .jwt
        .mint(&claims)
        .ok_or_else(|| AppError::Internal("demo needs an HS256 secret".into()))?;
    Ok(Json(json!({ "token": token })))
}
