//! `/api/keys`: device API keys, created and revoked by admins. The key is shown once.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use axum::{Json as JsonBody, Router};

use super::sites::valid_name;
use super::{Admin, AppError, AppState, Json};
use crate::auth::apikey;
use crate::store::Store;
use crate::wire::{ApiKeyCreated, CreateApiKey, KeyScope};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/keys", post(create))
        .route("/api/keys/{id}", delete(revoke))
}

/// Creates a key for the caller's organisation; the answer is the only place the key appears.
#[utoipa::path(post, path = "/api/keys", tag = "keys", security(("bearer" = [])),
    request_body = CreateApiKey,
    responses((status = 201, body = ApiKeyCreated), (status = 403, body = crate::wire::ApiError)))]
pub async fn create(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Json(req): Json<CreateApiKey>,
) -> Result<(StatusCode, JsonBody<ApiKeyCreated>), AppError> {
    let name = valid_name(&req.name)?;
    let scopes = req.scopes.unwrap_or_else(|| vec![KeyScope::Ingest]);
    if scopes.is_empty() {
        return Err(AppError::validation(
            "scopes",
            "must name at least one scope",
        ));
    }
    let created = create_key(&app.store, &admin.org_id, name, scopes).await?;
    Ok((StatusCode::CREATED, JsonBody(created)))
}

/// Makes and stores a key (shared by the API and `sensorwire apikey create`).
pub async fn create_key(
    store: &Store,
    org: &str,
    name: &str,
    mut scopes: Vec<KeyScope>,
) -> Result<ApiKeyCreated, crate::store::StoreError> {
    scopes.sort_by_key(|s| <&str>::from(*s));
    scopes.dedup();
    let key = apikey::generate();
    let joined = scopes
        .iter()
        .map(|s| s.as_ref())
        .collect::<Vec<_>>()
        .join(",");
    store
        .create_api_key(org, &key.id, name, &key.hash, &joined)
        .await?;
    Ok(ApiKeyCreated {
        id: key.id,
        key: key.secret,
        scopes,
    })
}

/// Revokes a key at once.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "keys", security(("bearer" = [])),
    params(("id" = String, Path, description = "Key id")),
    responses((status = 204), (status = 404, body = crate::wire::ApiError)))]
pub async fn revoke(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    if app.store.revoke_api_key(&admin.org_id, &id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound(format!("no key {id:?}")))
    }
}
