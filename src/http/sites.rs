//! `/api/sites`: list (any role), create and delete (admin).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json as JsonBody, Router};

use super::{Admin, AppError, AppState, Json, User};
use crate::auth::valid_id;
use crate::store::DeleteSite;
use crate::wire::{CreateSite, Site};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/sites", get(list).post(create))
        .route("/api/sites/{id}", delete(remove).get(get_one))
}

/// The caller's sites (only those in `site_ids` when the token has it).
#[utoipa::path(get, path = "/api/sites", tag = "sites", security(("bearer" = [])),
    responses((status = 200, body = [Site]), (status = 401, body = crate::wire::ApiError)))]
pub async fn list(
    State(app): State<AppState>,
    User(user): User,
) -> Result<JsonBody<Vec<Site>>, AppError> {
    let sites = app.store.list_sites(&user.org_id).await?;
    Ok(JsonBody(
        sites
            .into_iter()
            .filter(|s| user.can_see_site(&s.id))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/sites/{id}", tag = "sites", security(("bearer" = [])),
    params(("id" = String, Path, description = "Site id")),
    responses((status = 200, body = Site), (status = 404, body = crate::wire::ApiError)))]
pub async fn get_one(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<JsonBody<Site>, AppError> {
    let site = match user.can_see_site(&id) {
        true => app.store.get_site(&user.org_id, &id).await?,
        false => None,
    };
    site.map(JsonBody)
        .ok_or_else(|| AppError::NotFound(format!("no site {id:?}")))
}

/// Creates a site (admin). The id may be chosen by the caller.
#[utoipa::path(post, path = "/api/sites", tag = "sites", security(("bearer" = [])),
    request_body = CreateSite,
    responses((status = 201, body = Site), (status = 403, body = crate::wire::ApiError),
              (status = 409, body = crate::wire::ApiError), (status = 422, body = crate::wire::ApiError)))]
pub async fn create(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Json(req): Json<CreateSite>,
) -> Result<(StatusCode, JsonBody<Site>), AppError> {
    if admin.site_ids.is_some() {
        return Err(AppError::Forbidden(
            "a token restricted to some sites cannot create sites".into(),
        ));
    }
    let id = resolve_id(req.id, "s")?;
    let name = valid_name(&req.name)?;
    let site = app
        .store
        .create_site(&admin.org_id, &id, name)
        .await
        .map_err(|e| match AppError::from(e) {
            AppError::Conflict(_) => AppError::Conflict(format!("site {id:?} already exists")),
            other => other,
        })?;
    Ok((StatusCode::CREATED, JsonBody(site)))
}

/// Deletes an empty site (admin).
#[utoipa::path(delete, path = "/api/sites/{id}", tag = "sites", security(("bearer" = [])),
    params(("id" = String, Path, description = "Site id")),
    responses((status = 204), (status = 404, body = crate::wire::ApiError),
              (status = 409, body = crate::wire::ApiError, description = "The site still has units")))]
pub async fn remove(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    if !admin.can_see_site(&id) {
        return Err(AppError::NotFound(format!("no site {id:?}")));
    }
    match app.store.delete_site(&admin.org_id, &id).await? {
        DeleteSite::Deleted => Ok(StatusCode::NO_CONTENT),
        DeleteSite::NotFound => Err(AppError::NotFound(format!("no site {id:?}"))),
        DeleteSite::HasUnits => Err(AppError::Conflict(format!(
            "site {id:?} still has units; delete them first"
        ))),
    }
}

/// The caller's id if valid, or a fresh one with the given prefix.
pub(crate) fn resolve_id(id: Option<String>, prefix: &str) -> Result<String, AppError> {
    match id {
        Some(id) if valid_id(&id) => Ok(id),
        Some(_) => Err(AppError::validation(
            "id",
            "must be 1-64 characters of A-Z a-z 0-9 _ . : -",
        )),
        None => {
            let mut bytes = [0u8; 6];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            Ok(format!("{prefix}-{}", hex::encode(bytes)))
        }
    }
}

pub(crate) fn valid_name(name: &str) -> Result<&str, AppError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(AppError::validation("name", "must be 1-200 characters"));
    }
    Ok(name)
}
